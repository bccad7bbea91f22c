# /etc/pgadmin/config_system.py in the VM (pgAdmin reads it last, over its defaults),
# installed by provisioning/60-pgadmin.sh when PGADMIN=1.
SERVER_MODE = True
DATA_DIR = "/var/lib/pgadmin"
LOG_FILE = "/var/log/pgadmin/pgadmin4.log"
UPGRADE_CHECK_ENABLED = False
