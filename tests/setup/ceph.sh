#!/usr/bin/env bash
# Single-node Ceph cluster for nomad-driver-virt's RBD tests (Debian 12's own
# ceph 16.2 "pacific" packages, run as root, no systemd, cephx required).
#
#   - installs ceph-mon ceph-mgr ceph-osd ceph-common, libvirt's rbd storage
#     backend (libvirt-daemon-driver-storage-rbd) and qemu's rbd block driver
#     (qemu-block-extra, kept at qemu-system-x86's version like host.sh does);
#   - if libvirtd does not offer the rbd pool type yet (backend installed
#     after it started), restarts it and re-runs host.sh (starts it the same
#     way and makes sure network "default" is active);
#   - one monitor (mon.a), one manager (mgr.x), one BlueStore OSD (osd.0) on a
#     sparse file, all on 127.0.0.1 only (msgr v2 :3300 and v1 :6789);
#   - pool POOL (size 1) initialised with `rbd pool init`, and client.USER
#     with caps limited to that pool; its key in /etc/ceph (0600, root only);
#   - waits for HEALTH_OK (or fails with the daemons' log tails).
# Idempotent: a second run only checks; daemons that are not running (e.g.
# after a reboot) are started again from their existing data.
#
# Usage: tests/setup/ceph.sh            set up / start (idempotent)
#        tests/setup/ceph.sh --stop     stop the daemons, keep the data
#        tests/setup/ceph.sh --purge    stop and delete everything this script
#                                       created (packages stay installed)
#        tests/setup/ceph.sh --status   print `ceph -s` and the daemons' RSS
# Env:   CEPH_WAIT_SECS=120   bound for daemons to come up / HEALTH_OK
#        CEPH_POOL=ndvtest-rbd CEPH_USER=ndvtest (client.ndvtest)
#        CEPH_SETUP_FORCE_INSTALL=1  always run apt-get
#
# Files (what tests can rely on):
#   /etc/ceph/ceph.conf                      mon_host, cephx (0644)
#   /etc/ceph/ceph.client.admin.keyring      admin key (0600)
#   /etc/ceph/ceph.client.$USER.keyring      client key as keyring (0600)
#   /etc/ceph/ceph.client.$USER.key          client key, bare base64 (0600):
#       virsh secret-set-value UUID --file /etc/ceph/ceph.client.ndvtest.key
#   /var/lib/ceph/{mon/ceph-a,mgr/ceph-x,osd/ceph-0}   daemon data
#   /var/log/ceph/ceph-{mon.a,mgr.x,osd.0}.log         daemon logs
#   /run/ceph/ceph-*.pid                                pid files
set -euo pipefail

die() { echo "ceph.sh: ERROR: $*" >&2; exit 1; }
log() { echo "ceph.sh: $*"; }
trap 'echo "ceph.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

export DEBIAN_FRONTEND=noninteractive
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
URI=qemu:///system
WAIT_SECS=${CEPH_WAIT_SECS:-120}
POOL=${CEPH_POOL:-ndvtest-rbd}
CUSER=${CEPH_USER:-ndvtest}
MON_ID=a MGR_ID=x OSD_ID=0
MON_IP=127.0.0.1
MON_HOST="[v2:$MON_IP:3300,v1:$MON_IP:6789]"
CONF=/etc/ceph/ceph.conf
MARK="# managed by nomad-driver-virt tests/setup/ceph.sh"
ADMIN_KEYRING=/etc/ceph/ceph.client.admin.keyring
CLIENT_KEYRING=/etc/ceph/ceph.client.$CUSER.keyring
CLIENT_KEYFILE=/etc/ceph/ceph.client.$CUSER.key
MON_DIR=/var/lib/ceph/mon/ceph-$MON_ID
MGR_DIR=/var/lib/ceph/mgr/ceph-$MGR_ID
OSD_DIR=/var/lib/ceph/osd/ceph-$OSD_ID
RUN_DIR=/run/ceph
LOG_DIR=/var/log/ceph
OSD_BLOCK_SIZE=$((10 * 1024 * 1024 * 1024))   # sparse file; grows with data only

# ceph CLI as admin, bounded (a dead mon would make it hang for ever).
C() { timeout 30 ceph --connect-timeout 20 "$@"; }

# ---------------------------------------------------------------- daemons --
pidfile() { echo "$RUN_DIR/ceph-$1.pid"; }       # $1 = mon.a / mgr.x / osd.0
daemon_pid() { # prints the pid if daemon $1 runs (pid file + /proc check)
  local f pid; f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/cmdline" ] || return 1
  local cmd; cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  grep -q "ceph-${1%%.*} .*-i ${1#*.}\b" <<<"$cmd" || return 1
  echo "$pid"
}
start_daemon() { # $1 = mon.a ...; starts it (daemonizes) unless running
  local name=$1 type=${1%%.*} id=${1#*.}
  if daemon_pid "$name" >/dev/null; then return 0; fi
  log "starting $name"
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  rm -f "$(pidfile "$name")"
  "ceph-$type" --cluster ceph -i "$id" </dev/null >>"$LOG_DIR/ceph-$name.stdout" 2>&1 \
    || fail_with_logs "ceph-$type -i $id exited with an error"
  local deadline=$(( $(date +%s) + 15 ))
  until daemon_pid "$name" >/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail_with_logs "$name did not write its pid file within 15s"
    sleep 0.2
  done
}
stop_daemon() { # SIGTERM via the pid file, SIGKILL after 20 s
  local name=$1 pid i
  pid=$(daemon_pid "$name") || { rm -f "$(pidfile "$name")"; return 0; }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then log "$name still alive after 20s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$(pidfile "$name")"
}
fail_with_logs() {
  echo "ceph.sh: ERROR: $*" >&2
  local n
  for n in mon.$MON_ID mgr.$MGR_ID osd.$OSD_ID; do
    echo "---- $n: pid $(daemon_pid "$n" || echo none); tail of $LOG_DIR/ceph-$n.log ----" >&2
    tail -n 25 "$LOG_DIR/ceph-$n.log" 2>/dev/null | sed 's/^/  | /' >&2 || true
    [ -s "$LOG_DIR/ceph-$n.stdout" ] && tail -n 5 "$LOG_DIR/ceph-$n.stdout" | sed 's/^/  ! /' >&2
  done
  echo "---- ceph -s ----" >&2
  timeout 15 ceph --connect-timeout 10 -s >&2 2>&1 || true
  timeout 15 ceph --connect-timeout 10 health detail >&2 2>&1 || true
  exit 1
}
daemon_rss() { local p; p=$(daemon_pid "$1") && awk '/^VmRSS/ {printf "%d MiB", $2/1024}' "/proc/$p/status" || echo "not running"; }

conf_is_ours() { [ -f "$CONF" ] && grep -qxF "$MARK" "$CONF"; }

# ------------------------------------------------------------ --stop/purge --
case "${1:-}" in
  --stop|--purge)
    if [ "$1" = --purge ] && [ -f "$CONF" ] && ! conf_is_ours; then
      die "$CONF exists but was not written by this script; not touching it"
    fi
    # OSD first, then mgr, mon (clean OSD shutdown needs the mon).
    for n in osd.$OSD_ID mgr.$MGR_ID mon.$MON_ID; do stop_daemon "$n"; done
    if [ "$1" = --purge ]; then
      rbd_pools=$(command -v virsh >/dev/null && timeout 30 virsh -q -c "$URI" pool-list --all --type rbd 2>/dev/null || true)
      if [ -n "$rbd_pools" ]; then
        log "WARNING: libvirt still has rbd pools defined (they will fail to start): $(awk '{print $1}' <<<"$rbd_pools" | tr '\n' ' ')"
      fi
      log "removing cluster data, keys and logs"
      rm -rf "$MON_DIR" "$MGR_DIR" "$OSD_DIR" /var/lib/ceph/tmp/ndvtest.*
      rm -f "$CONF" "$ADMIN_KEYRING" "$CLIENT_KEYRING" "$CLIENT_KEYFILE"
      rm -f "$LOG_DIR"/ceph-mon."$MON_ID".* "$LOG_DIR"/ceph-mgr."$MGR_ID".* "$LOG_DIR"/ceph-osd."$OSD_ID".* \
            "$LOG_DIR"/ceph.log "$LOG_DIR"/ceph.audit.log "$LOG_DIR"/ceph-client.*.log
      rm -f "$RUN_DIR"/ceph-*.asok "$RUN_DIR"/ceph-*.pid
    fi
    log "${1#--}: done"
    exit 0 ;;
  --status)
    C -s || true
    for n in mon.$MON_ID mgr.$MGR_ID osd.$OSD_ID; do echo "$n: pid $(daemon_pid "$n" || echo none), RSS $(daemon_rss "$n")"; done
    exit 0 ;;
  "") ;;
  *) die "unknown argument '$1' (use --stop, --purge or --status)" ;;
esac

t0=$(date +%s.%N)
elapsed() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN{printf "%.1f", a-b}'; }

# --------------------------------------------------------------- packages --
PKGS=(ceph-mon ceph-mgr ceph-osd ceph-common libvirt-daemon-driver-storage-rbd)

installed_version() {
  dpkg-query -W -f='${db:Status-Abbrev}|${Version}\n' "$1" 2>/dev/null | awk -F'|' '$1 ~ /^ii/ {print $2}'
}
packages_ok() {
  local p
  for p in "${PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || { log "missing package: $p"; return 1; }
  done
  local qv; qv=$(installed_version qemu-system-x86)
  [ -n "$qv" ] || { log "qemu-system-x86 not installed"; return 1; }
  [ "$(installed_version qemu-block-extra)" = "$qv" ] || { log "qemu-block-extra is not at qemu-system-x86's version $qv"; return 1; }
  [ -n "$(find /usr/lib/x86_64-linux-gnu/qemu -name 'block-rbd.so' 2>/dev/null)" ] || { log "qemu block-rbd.so missing"; return 1; }
  [ -n "$(find /usr/lib/x86_64-linux-gnu/libvirt/storage-backend -name '*rbd*' 2>/dev/null)" ] || { log "libvirt rbd storage backend missing"; return 1; }
  local b
  for b in ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool rbd virsh; do
    command -v "$b" >/dev/null || { log "missing command: $b"; return 1; }
  done
}
# Version from bookworm (not *-backports) for a package, like host.sh does for qemu.
bookworm_version() {
  apt-cache madison "$1" \
    | awk -F'|' '{gsub(/^ +| +$/,"",$2); gsub(/^ +| +$/,"",$3); if ($3 !~ /backports/ && $2 !~ /bpo/) print $2}' \
    | sort -u | sort -V -r | head -n1 || true
}

if [ "${CEPH_SETUP_FORCE_INSTALL:-0}" != 1 ] && packages_ok; then
  log "packages: all present (fast path, no apt-get)"
else
  # qemu + qemu-block-extra pinning is host.sh's business: make sure it ran.
  if [ -z "$(installed_version qemu-system-x86)" ] \
     || [ "$(installed_version qemu-block-extra)" != "$(installed_version qemu-system-x86)" ]; then
    log "qemu / qemu-block-extra not installed as host.sh pins them: running host.sh"
    HOST_SETUP_FORCE_INSTALL=1 bash "$HERE/host.sh" || die "host.sh failed"
  fi
  log "apt-get update"
  apt-get update -qq || die "apt-get update failed"
  # All ceph packages at one bookworm version (librbd1, which qemu-block-extra
  # links against, comes along at the same version).
  CV=$(bookworm_version ceph-common)
  [ -n "$CV" ] || die "apt knows no bookworm version of ceph-common (apt-cache policy ceph-common)"
  QV=$(installed_version qemu-system-x86)
  args=()
  for p in "${PKGS[@]}"; do
    case $p in ceph-*) args+=("$p=$CV") ;; *) args+=("$p") ;; esac
  done
  args+=("qemu-block-extra=$QV")
  log "apt-get install ${args[*]}"
  # Without systemd the packages' postinst only fails to talk to the bus; harmless.
  apt-get install -y -q --no-install-recommends --allow-downgrades \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${args[@]}" \
    || die "apt-get install failed"
  packages_ok || die "packages still missing after apt-get install"
fi
t_pkgs=$(elapsed "$t0")

# ---------------------------------------------- libvirt: rbd pool backend --
# Prints yes/no from `virsh pool-capabilities`; fails if libvirtd does not answer.
rbd_pool_supported() {
  local caps; caps=$(timeout 30 virsh -q -c "$URI" pool-capabilities 2>/dev/null) || return 1
  if grep -q "<pool type='rbd' supported='yes'>" <<<"$caps"; then echo yes; else echo no; fi
}
if ! pidof libvirtd >/dev/null; then
  log "libvirtd not running: running host.sh"
  bash "$HERE/host.sh" >/dev/null || die "host.sh failed"
fi
# A libvirtd that does not answer is never restarted here (it may be busy,
# e.g. starting a domain whose RBD disk cannot reach its monitor): only one
# that answers and says the rbd pool type is unsupported.
rbd_sup=
deadline=$(( $(date +%s) + WAIT_SECS ))
until rbd_sup=$(rbd_pool_supported); do
  [ "$(date +%s)" -lt "$deadline" ] || die "libvirtd (pid $(pidof libvirtd || echo none)) does not answer 'virsh pool-capabilities' within ${WAIT_SECS}s; not touching it"
  sleep 1
done
if [ "$rbd_sup" = no ]; then
  # libvirtd loads its storage backends at start (the rbd one was installed
  # after it started): restart it the way host.sh starts it. Running domains
  # survive a libvirtd restart (qemu keeps running).
  pid=$(pidof libvirtd)
  log "libvirtd (pid $pid) has no rbd storage backend loaded: restarting it"
  kill -TERM "$pid"
  for _ in $(seq 1 200); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
  [ -d "/proc/$pid" ] && die "libvirtd pid $pid did not exit within 40s of SIGTERM"
  bash "$HERE/host.sh" >/dev/null || die "host.sh failed to start libvirtd again"
  [ "$(rbd_pool_supported)" = yes ] || die "libvirt still reports pool type rbd unsupported after restart (virsh pool-capabilities)"
  log "libvirtd restarted (pid $(pidof libvirtd)); network default active"
fi

# ------------------------------------------------------------ ceph.conf --
if [ -f "$CONF" ] && ! conf_is_ours; then
  die "$CONF exists and was not written by this script; refusing to touch another cluster's config"
fi
if [ -f "$CONF" ]; then
  FSID=$(awk -F' *= *' '$1 == "fsid" {print $2; exit}' "$CONF")
  [ -n "$FSID" ] || die "$CONF has no fsid; run '$0 --purge' for a clean slate"
else
  FSID=$(uuidgen)
fi
mkdir -p /etc/ceph "$RUN_DIR" "$LOG_DIR" /var/lib/ceph/tmp
new_conf=$(cat <<EOF
$MARK
# Single-node test cluster on loopback only. Do not edit: re-run the script.
[global]
fsid = $FSID
mon_initial_members = $MON_ID
mon_host = $MON_HOST
public_network = 127.0.0.0/8
public_addr = $MON_IP
cluster_addr = $MON_IP
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
# all clients here are pacific (16.2.15): no insecure global_id reclaim
# (otherwise the mon warns AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED)
auth_allow_insecure_global_id_reclaim = false
# one OSD: replicas 1, failure domain "osd", no warning about that
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
# the CI disk is shared with builds: warn at 10% free, not 30% (MON_DISK_LOW)
mon_data_avail_warn = 10
# ceph-mgr loads every module into its own python sub-interpreter: load
# only the always-on ones (disabling those is a HEALTH_ERR MGR_MODULE_ERROR)
# plus iostat; no dashboards/exporters, nfs, restful, selftest, ...
mgr_initial_modules = iostat
mgr_disabled_modules = alerts diskprediction_local influx insights localpool mirroring nfs osd_perf_query osd_support prometheus restful selftest snap_schedule stats telegraf test_orchestrator zabbix

[mon]
pid_file = $RUN_DIR/\$cluster-\$name.pid

[mgr]
pid_file = $RUN_DIR/\$cluster-\$name.pid

[osd]
pid_file = $RUN_DIR/\$cluster-\$name.pid
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $OSD_BLOCK_SIZE
# small memory footprint (CI machine, shared)
osd_memory_target = 939524096
bluestore_cache_autotune = false
bluestore_cache_size = 67108864
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
EOF
)
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  [ -f "$CONF" ] && log "updating $CONF (running daemons keep their old settings until restarted: '$0 --stop' then '$0')"
  printf '%s\n' "$new_conf" >"$CONF.tmp" && chmod 0644 "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
fi

# -------------------------------------------------------------- monitor --
if [ ! -f "$MON_DIR/done" ]; then
  [ -d "$OSD_DIR" ] && die "monitor data missing but OSD data exists: run '$0 --purge' first"
  log "creating monitor mon.$MON_ID (fsid $FSID)"
  tmp=$(mktemp -d /var/lib/ceph/tmp/ndvtest.XXXXXX)
  umask 077
  ceph-authtool --create-keyring "$tmp/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  if [ ! -f "$ADMIN_KEYRING" ]; then
    ceph-authtool --create-keyring "$ADMIN_KEYRING" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  fi
  chmod 0600 "$ADMIN_KEYRING"
  ceph-authtool "$tmp/mon.keyring" --import-keyring "$ADMIN_KEYRING" >/dev/null
  monmaptool --create --fsid "$FSID" --addv "$MON_ID" "$MON_HOST" "$tmp/monmap" >/dev/null
  umask 022
  rm -rf "$MON_DIR"; mkdir -p "$MON_DIR"
  ceph-mon --cluster ceph --mkfs -i "$MON_ID" --monmap "$tmp/monmap" --keyring "$tmp/mon.keyring" \
    >"$tmp/mkfs.log" 2>&1 || { cat "$tmp/mkfs.log" >&2; die "ceph-mon --mkfs failed"; }
  touch "$MON_DIR/done"
  rm -rf "$tmp"
fi
start_daemon mon.$MON_ID
deadline=$(( $(date +%s) + WAIT_SECS ))
until C mon stat >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || fail_with_logs "monitor does not answer within ${WAIT_SECS}s"
  sleep 0.5
done
t_mon=$(elapsed "$t0")

# -------------------------------------------------------------- manager --
if [ ! -s "$MGR_DIR/keyring" ]; then
  log "creating manager mgr.$MGR_ID"
  mkdir -p "$MGR_DIR"
  C auth get-or-create "mgr.$MGR_ID" mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$MGR_DIR/keyring.tmp" >/dev/null
  chmod 0600 "$MGR_DIR/keyring.tmp"; mv "$MGR_DIR/keyring.tmp" "$MGR_DIR/keyring"
fi
start_daemon mgr.$MGR_ID

# ------------------------------------------------------------------ OSD --
if [ ! -f "$OSD_DIR/ready" ]; then
  log "creating OSD osd.$OSD_ID (BlueStore on a sparse $((OSD_BLOCK_SIZE >> 30)) GiB file $OSD_DIR/block)"
  # leftovers of an interrupted creation
  rm -rf "$OSD_DIR"
  # (no `C ... | grep -q`: with pipefail, grep closing the pipe early can fail it via SIGPIPE)
  if grep -qx "$OSD_ID" <<<"$(C osd ls 2>/dev/null)"; then
    C osd purge "$OSD_ID" --yes-i-really-mean-it >/dev/null
  fi
  C auth del "osd.$OSD_ID" >/dev/null 2>&1 || true
  mkdir -p "$OSD_DIR"
  uuid=$(uuidgen)
  got=$(C osd new "$uuid" "$OSD_ID")
  [ "$got" = "$OSD_ID" ] || die "ceph osd new returned id '$got', wanted $OSD_ID"
  ceph-osd --cluster ceph -i "$OSD_ID" --mkfs --mkkey --no-mon-config --osd-uuid "$uuid" \
    >"$LOG_DIR/ceph-osd.$OSD_ID.mkfs.log" 2>&1 \
    || { tail -n 30 "$LOG_DIR/ceph-osd.$OSD_ID.mkfs.log" >&2; die "ceph-osd --mkfs failed"; }
  C auth add "osd.$OSD_ID" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$OSD_DIR/keyring" >/dev/null
  chmod 0600 "$OSD_DIR/keyring"
  [ -f "$OSD_DIR/ready" ] || die "ceph-osd --mkfs did not write $OSD_DIR/ready"
fi
start_daemon osd.$OSD_ID
deadline=$(( $(date +%s) + WAIT_SECS ))
until [ "$(C osd stat -f json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("num_up_osds", 0))' 2>/dev/null)" = 1 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail_with_logs "osd.$OSD_ID not up within ${WAIT_SECS}s"
  sleep 0.5
done
t_osd=$(elapsed "$t0")

# ----------------------------------------------------------- pool + user --
pools=$(C osd pool ls) || fail_with_logs "ceph osd pool ls failed"
if ! grep -qxF "$POOL" <<<"$pools"; then
  log "creating pool $POOL"
  C osd pool create "$POOL" 8 8 replicated >/dev/null
  C osd pool set "$POOL" size 1 --yes-i-really-mean-it >/dev/null
  C osd pool set "$POOL" min_size 1 >/dev/null
fi
if ! grep -q '"rbd"' <<<"$(C osd pool application get "$POOL" 2>/dev/null)"; then
  log "rbd pool init $POOL"
  timeout 60 rbd pool init "$POOL" || fail_with_logs "rbd pool init $POOL failed"
fi
# caps: only RBD on this pool (profile rbd = what librbd/qemu/libvirt need)
if ! C auth get "client.$CUSER" >/dev/null 2>&1; then
  log "creating user client.$CUSER (caps limited to pool $POOL)"
  C auth get-or-create "client.$CUSER" mon 'profile rbd' osd "profile rbd pool=$POOL" \
    mgr "profile rbd pool=$POOL" >/dev/null
fi
umask 077
key=$(C auth get-key "client.$CUSER")
[ -n "$key" ] || die "could not read the key of client.$CUSER"
if [ ! -f "$CLIENT_KEYFILE" ] || [ "$(cat "$CLIENT_KEYFILE")" != "$key" ]; then
  printf '%s' "$key" >"$CLIENT_KEYFILE"
  rm -f "$CLIENT_KEYRING"
fi
if [ ! -s "$CLIENT_KEYRING" ]; then
  C auth get "client.$CUSER" -o "$CLIENT_KEYRING" >/dev/null 2>&1 || die "could not write $CLIENT_KEYRING"
fi
chmod 0600 "$CLIENT_KEYFILE" "$CLIENT_KEYRING"
umask 022
unset key

# --------------------------------------------------------------- health --
deadline=$(( $(date +%s) + WAIT_SECS ))
while :; do
  h=$(C health 2>&1 || true)
  [ "$h" = HEALTH_OK ] && break
  [ "$(date +%s)" -lt "$deadline" ] || fail_with_logs "cluster not HEALTH_OK within ${WAIT_SECS}s: $h"
  sleep 1
done
# the client user can reach its pool (cephx + caps)
timeout 30 rbd --id "$CUSER" -p "$POOL" ls >/dev/null \
  || fail_with_logs "client.$CUSER cannot list pool $POOL"

echo "---- ceph setup summary ----"
echo "ceph:      $(ceph --version | awk '{print $3, $5}')"
echo "cluster:   fsid $FSID, mon_host $MON_HOST, cephx required, $(C health)"
echo "pool:      $POOL (size 1, rbd), user client.$CUSER, key $CLIENT_KEYFILE (0600)"
for n in mon.$MON_ID mgr.$MGR_ID osd.$OSD_ID; do
  echo "daemon:    $n pid $(daemon_pid "$n"), RSS $(daemon_rss "$n"), log $LOG_DIR/ceph-$n.log"
done
echo "timing:    packages ${t_pkgs}s, mon answering ${t_mon}s, osd up ${t_osd}s, pool/user + HEALTH_OK: total $(elapsed "$t0")s"
echo "ceph.sh: OK"
