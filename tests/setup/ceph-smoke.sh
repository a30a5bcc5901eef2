#!/usr/bin/env bash
# Manual check of the libvirt RBD path with virsh only (no Rust), against the
# cluster of tests/setup/ceph.sh:
#   ceph secret (client key) -> rbd storage pool -> raw volume (vol-create-as)
#   -> the test guest written into it (vol-upload is tried; libvirt 9.0's rbd
#   backend does not support it, so qemu-img convert -n through librbd does it)
#   -> COW clone of it (virsh vol-clone = rbd snap+protect+clone)
#   -> TCG domain booting the clone as <disk type='network' protocol='rbd'>
#   -> GUEST-BOOT on the serial console -> cleanup (domain, volumes, snapshots,
#   pool, secret; `rbd ls` empty again).
# With CEPH_SMOKE_ERRORS=1 it also records libvirt's messages for a wrong key
# and for an unreachable cluster (stops mon.a for a moment, then runs
# ceph.sh to start it again).
#
# Usage: tests/setup/ceph-smoke.sh [IMAGE]   (default /var/lib/nomad-driver-virt-test/guest.qcow2)
# Env:   BOOT_TIMEOUT=120  KEEP=1 (keep temp dir)  CEPH_POOL  CEPH_USER
#        CEPH_SMOKE_ERRORS=1  (also the error cases; takes ~1-2 min more)
#        CEPH_MON_PORT=6789   (port in the pool/disk <host>; 3300 = msgr v2)
#        MONDOWN_DOMAIN_TIMEOUT=60  how long to watch the domain start with the mon down
# Prereqs: host.sh, guest.sh and ceph.sh have been run.
set -uo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
IMAGE=${1:-/var/lib/nomad-driver-virt-test/guest.qcow2}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-120}
POOL=${CEPH_POOL:-ndvtest-rbd}
CUSER=${CEPH_USER:-ndvtest}
PORT=${CEPH_MON_PORT:-6789}
KEYFILE=/etc/ceph/ceph.client.$CUSER.key
URI=qemu:///system
V() { virsh -q -c "$URI" "$@"; }
R() { timeout 60 rbd -p "$POOL" "$@"; }   # admin

PASSED=0; FAILED=0
pass() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
die()  { echo "FAIL: $*"; FAILED=$((FAILED + 1)); exit 1; }
note() { echo "NOTE: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "ceph-smoke: must run as root" >&2; exit 2; }
[ -f "$IMAGE" ] || { echo "ceph-smoke: no image $IMAGE (run tests/setup/guest.sh)" >&2; exit 2; }
[ -f "$KEYFILE" ] || { echo "ceph-smoke: no $KEYFILE (run tests/setup/ceph.sh)" >&2; exit 2; }
for c in virsh qemu-img rbd ceph uuidgen ceph-authtool; do
  command -v "$c" >/dev/null || { echo "ceph-smoke: missing $c" >&2; exit 2; }
done
timeout 30 ceph --connect-timeout 20 health >/dev/null 2>&1 || { echo "ceph-smoke: cluster does not answer (run tests/setup/ceph.sh)" >&2; exit 2; }

TAG=ndvsmoke-$$-$RANDOM
NAME=$TAG                     # domain
LPOOL=$TAG                    # libvirt pool name
VOL=$TAG-base                 # rbd images
CLONE=$TAG-clone
CLI_CLONE=$TAG-cliclone
SECRET_UUID=$(uuidgen)
BAD_SECRET_UUID=$(uuidgen)
TMP=$(mktemp -d /tmp/ndvtest-ceph-smoke.XXXXXX); chmod 0755 "$TMP"
CONSOLE=$TMP/console.log

cleanup() {
  local rc=$?
  V destroy "$NAME" >/dev/null 2>&1
  V destroy "$NAME-bad" >/dev/null 2>&1
  V destroy "$NAME-down" >/dev/null 2>&1
  # libvirt first (it knows the clone's snapshot), then whatever is left via rbd
  if V pool-info "$LPOOL" >/dev/null 2>&1; then
    V pool-start "$LPOOL" >/dev/null 2>&1
    V vol-delete "$CLONE" --pool "$LPOOL" >/dev/null 2>&1
    V vol-delete "$VOL" --pool "$LPOOL" --delete-snapshots >/dev/null 2>&1
    V pool-destroy "$LPOOL" >/dev/null 2>&1
    V pool-undefine "$LPOOL" >/dev/null 2>&1
  fi
  V pool-destroy "$LPOOL-bad" >/dev/null 2>&1; V pool-undefine "$LPOOL-bad" >/dev/null 2>&1
  local img s
  for img in $(R ls 2>/dev/null | grep "^$TAG-" | sort -r); do   # clones sort after their parent: reverse
    for s in $(R snap ls "$img" --format json 2>/dev/null | python3 -c 'import json,sys; [print(x["name"]) for x in json.load(sys.stdin)]' 2>/dev/null); do
      R snap unprotect "$img@$s" >/dev/null 2>&1; R snap rm "$img@$s" >/dev/null 2>&1
    done
    R rm "$img" >/dev/null 2>&1 || echo "ceph-smoke: could not remove rbd image $POOL/$img" >&2
  done
  V secret-undefine "$SECRET_UUID" >/dev/null 2>&1
  V secret-undefine "$BAD_SECRET_UUID" >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then echo "ceph-smoke: kept $TMP"; else rm -rf "$TMP"; fi
  local left; left=$(R ls 2>&1 | grep -c "^$TAG-\|couldn't connect")
  [ "$left" = 0 ] || { echo "FAIL: $left rbd image(s) of this run left in $POOL"; FAILED=$((FAILED + 1)); }
  echo "ceph-smoke: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] && [ "$rc" -eq 0 ] && exit 0 || exit 1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- secret (usage type ceph, value = the client key) ----
cat >"$TMP/secret.xml" <<XML
<secret ephemeral='no' private='yes'>
  <uuid>$SECRET_UUID</uuid>
  <description>ndvtest ceph-smoke: client.$CUSER key</description>
  <usage type='ceph'>
    <name>client.$CUSER $TAG</name>
  </usage>
</secret>
XML
V secret-define "$TMP/secret.xml" >/dev/null || die "secret-define failed"
# --file: the key never appears on a command line; the file holds the base64
# key exactly as `ceph auth get-key` prints it (libvirt base64-decodes it).
V secret-set-value "$SECRET_UUID" --file "$KEYFILE" >/dev/null || die "secret-set-value failed"
pass "secret $SECRET_UUID (usage ceph) holds client.$CUSER's key"

# ---- rbd pool ----
pool_xml() { # name secret-uuid
cat <<XML
<pool type='rbd'>
  <name>$1</name>
  <source>
    <name>$POOL</name>
    <host name='127.0.0.1' port='$PORT'/>
    <auth type='ceph' username='$CUSER'>
      <secret uuid='$2'/>
    </auth>
  </source>
</pool>
XML
}
pool_xml "$LPOOL" "$SECRET_UUID" >"$TMP/pool.xml"
V pool-define "$TMP/pool.xml" >/dev/null || die "pool-define failed"
t=$(date +%s.%N)
V pool-start "$LPOOL" >/dev/null || die "pool-start failed"
pass "rbd pool $LPOOL started in $(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN{printf "%.1f", a-b}')s: $(V pool-info "$LPOOL" | awk '/^Capacity/ {print "capacity", $2, $3}')"

# ---- volume + upload ----
qemu-img convert -O raw "$IMAGE" "$TMP/guest.raw" || die "qemu-img convert to raw failed"
raw_size=$(stat -c %s "$TMP/guest.raw")
cap=$(( (raw_size + 1048575) / 1048576 * 1048576 ))
V vol-create-as "$LPOOL" "$VOL" "${cap}b" --format raw >/dev/null || die "vol-create-as $VOL failed"
pass "vol-create-as $VOL ${cap} bytes"
# libvirt 9.0's rbd backend has no volume upload (nor vol-create-from out of
# another pool): record the message, then write the image with qemu-img
# through librbd into the volume libvirt created, with the key from the file
# (a qemu secret object: format=base64 because qemu base64-encodes it again
# for librados) and the mon address given explicitly: no keyring, no
# ceph.conf needed.
if V vol-upload "$VOL" "$TMP/guest.raw" --pool "$LPOOL" --sparse 2>"$TMP/upload.err"; then
  pass "vol-upload --sparse worked"
else
  note "vol-upload --sparse is not supported: $(grep -v '^$' "$TMP/upload.err" | tail -n1)"
  t=$(date +%s.%N)
  qemu-img convert -n -f qcow2 \
    --object "secret,id=sec0,file=$KEYFILE,format=base64" --target-image-opts "$IMAGE" \
    "driver=rbd,pool=$POOL,image=$VOL,user=$CUSER,key-secret=sec0,server.0.host=127.0.0.1,server.0.port=$PORT" \
    || die "qemu-img convert into rbd:$POOL/$VOL failed"
  pass "qemu-img convert -n qcow2 -> rbd:$POOL/$VOL in $(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN{printf "%.1f", a-b}')s"
fi
# content check: the first raw_size bytes on RBD equal the file
if timeout 60 rbd export --no-progress "$POOL/$VOL" "$TMP/export.raw" >/dev/null 2>&1 \
   && cmp -s -n "$raw_size" "$TMP/export.raw" "$TMP/guest.raw"; then
  pass "rbd export matches the uploaded raw image"
else
  fail "rbd content differs from the uploaded raw image"
fi
note "rbd du: $(R du "$VOL" 2>/dev/null | tail -n1)"

# ---- COW clone through libvirt: vol-clone (= snapshot + protect + clone) ----
V vol-clone "$VOL" "$CLONE" --pool "$LPOOL" >/dev/null 2>"$TMP/clone.err"
if [ $? -eq 0 ]; then
  parent=$(R info "$CLONE" 2>/dev/null | awk '/parent:/ {print $2}')
  if [ -n "$parent" ]; then
    pass "virsh vol-clone made an RBD COW clone: $POOL/$CLONE parent $parent"
  else
    fail "virsh vol-clone made a full copy, not a COW clone (rbd info shows no parent)"
  fi
  note "vol-dumpxml $CLONE: $(V vol-dumpxml "$CLONE" --pool "$LPOOL" | tr -s ' \n' ' ')"
else
  fail "virsh vol-clone failed: $(tr '\n' ' ' <"$TMP/clone.err")"
  CLONE=$VOL
fi
# <backingStore> in a new volume's XML: what does the rbd backend say?
cat >"$TMP/vol-backing.xml" <<XML
<volume>
  <name>$TAG-backing</name>
  <capacity unit='bytes'>$cap</capacity>
  <target><format type='raw'/></target>
  <backingStore><path>$POOL/$VOL</path><format type='raw'/></backingStore>
</volume>
XML
if V vol-create "$LPOOL" "$TMP/vol-backing.xml" >/dev/null 2>"$TMP/backing.err"; then
  bparent=$(R info "$TAG-backing" 2>/dev/null | awk '/parent:/ {print $2}')
  if [ -n "$bparent" ]; then
    note "vol-create with <backingStore> made a clone of $bparent"
  else
    note "vol-create with <backingStore> succeeds but IGNORES it: a plain empty image, no parent (rbd info)"
  fi
  V vol-delete "$TAG-backing" --pool "$LPOOL" >/dev/null 2>&1
else
  note "vol-create with <backingStore> fails: $(tr '\n' ' ' <"$TMP/backing.err")"
fi
# the same with the rbd CLI (what a driver would do through librbd)
if R snap create --no-progress "$VOL@cli" && R snap protect "$VOL@cli" && R clone "$POOL/$VOL@cli" "$POOL/$CLI_CLONE" >/dev/null 2>&1; then
  V pool-refresh "$LPOOL" >/dev/null
  pass "rbd CLI snap create+protect+clone works; libvirt sees it after pool-refresh: $(V vol-list "$LPOOL" | awk -v c="$CLI_CLONE" '$1 == c {print "yes"}')"
  R rm "$CLI_CLONE" >/dev/null 2>&1; R snap unprotect "$VOL@cli"; R snap rm --no-progress "$VOL@cli" >/dev/null 2>&1
  V pool-refresh "$LPOOL" >/dev/null
else
  fail "rbd CLI clone failed"
fi

# ---- boot a TCG domain from the clone over RBD ----
domain_xml() { # name secret-uuid console image
cat <<XML
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source protocol='rbd' name='$POOL/$4'>
        <host name='127.0.0.1' port='$PORT'/>
      </source>
      <auth username='$CUSER'>
        <secret type='ceph' uuid='$2'/>
      </auth>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='$3'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='$3'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
XML
}
domain_xml "$NAME" "$SECRET_UUID" "$CONSOLE" "$CLONE" >"$TMP/domain.xml"
t0=$(date +%s.%N)
V create "$TMP/domain.xml" >/dev/null || die "virsh create (rbd network disk) failed"
pass "domain $NAME created with vda = rbd:$POOL/$CLONE"
booted=0
deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if grep -q '^GUEST-BOOT' "$CONSOLE" 2>/dev/null; then booted=1; break; fi
  V dominfo "$NAME" >/dev/null 2>&1 || break
  sleep 0.5
done
if [ "$booted" = 1 ]; then
  pass "guest booted from RBD: $(grep -m1 '^GUEST-BOOT' "$CONSOLE" | tr -d '\r') after $(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}')s"
else
  echo "---- console ----"; tr -d '\r' <"$CONSOLE" 2>/dev/null | sed 's/^/  | /'
  fail "no GUEST-BOOT within ${BOOT_TIMEOUT}s"
fi
note "qemu -blockdev for vda: $(tr '\0' ' ' </proc/"$(pgrep -f "guest=$NAME," | head -n1)"/cmdline 2>/dev/null | grep -o '"driver":"rbd"[^}]*}' | sed 's/"key-secret":"[^"]*"/"key-secret":"<id>"/' | head -n1)"
V destroy "$NAME" >/dev/null || fail "virsh destroy failed"

# ---- error cases ----
if [ "${CEPH_SMOKE_ERRORS:-0}" = 1 ]; then
  # (b) wrong key: a well-formed key that is not client.$CUSER's
  cat >"$TMP/bad-secret.xml" <<XML
<secret ephemeral='no' private='yes'>
  <uuid>$BAD_SECRET_UUID</uuid>
  <usage type='ceph'><name>client.$CUSER $TAG wrong key</name></usage>
</secret>
XML
  V secret-define "$TMP/bad-secret.xml" >/dev/null
  ceph-authtool --gen-print-key | tr -d '\n' >"$TMP/bad.key"
  V secret-set-value "$BAD_SECRET_UUID" --file "$TMP/bad.key" >/dev/null
  pool_xml "$LPOOL-bad" "$BAD_SECRET_UUID" >"$TMP/pool-bad.xml"
  V pool-define "$TMP/pool-bad.xml" >/dev/null
  t=$(date +%s)
  if out=$(timeout 120 virsh -c "$URI" pool-start "$LPOOL-bad" 2>&1); then
    fail "pool-start with a wrong key succeeded"
  else
    pass "wrong key, pool-start fails after $(( $(date +%s) - t ))s: $(tr -s '\n' ' ' <<<"$out")"
  fi
  V pool-undefine "$LPOOL-bad" >/dev/null
  domain_xml "$NAME-bad" "$BAD_SECRET_UUID" "$TMP/console-bad.log" "$VOL" >"$TMP/domain-bad.xml"
  t=$(date +%s)
  if out=$(timeout 120 virsh -c "$URI" create "$TMP/domain-bad.xml" 2>&1); then
    fail "domain start with a wrong key succeeded"; V destroy "$NAME-bad" >/dev/null 2>&1
  else
    pass "wrong key, domain start fails after $(( $(date +%s) - t ))s: $(tr -s '\n' ' ' <<<"$out")"
  fi

  # (a) cluster unreachable: stop the monitor (the only one)
  monpid=$(cat /run/ceph/ceph-mon.a.pid 2>/dev/null)
  if [ -n "$monpid" ] && [ -d "/proc/$monpid" ]; then
    kill -TERM "$monpid"
    for _ in $(seq 1 50); do [ -d "/proc/$monpid" ] || break; sleep 0.2; done
    V pool-destroy "$LPOOL" >/dev/null
    t=$(date +%s)
    if out=$(timeout 120 virsh -c "$URI" pool-start "$LPOOL" 2>&1); then
      fail "pool-start with the mon stopped succeeded"
    else
      pass "mon down, pool-start fails after $(( $(date +%s) - t ))s: $(tr -s '\n' ' ' <<<"$out")"
    fi
    # qemu's librados gets no client_mount_timeout from libvirt (librados
    # default: 300 s), so the start blocks. Run it in the background, note
    # whether it is still blocked after MONDOWN_DOMAIN_TIMEOUT, then start
    # the monitor again and see how the start ends.
    domain_xml "$NAME-down" "$SECRET_UUID" "$TMP/console-down.log" "$VOL" >"$TMP/domain-down.xml"
    t=$(date +%s)
    ( virsh -c "$URI" create "$TMP/domain-down.xml" >"$TMP/down.out" 2>&1; echo "rc=$? after $(( $(date +%s) - t ))s" >>"$TMP/down.out" ) &
    downpid=$!
    for _ in $(seq 1 "${MONDOWN_DOMAIN_TIMEOUT:-60}"); do grep -q '^rc=' "$TMP/down.out" 2>/dev/null && break; sleep 1; done
    if grep -q '^rc=' "$TMP/down.out"; then
      pass "mon down, domain start returned: $(tr -s '\n' ' ' <"$TMP/down.out")"
    else
      pass "mon down, domain start still blocked after ${MONDOWN_DOMAIN_TIMEOUT:-60}s (libvirtd answers meanwhile: $(timeout 10 virsh -q -c "$URI" version >/dev/null 2>&1 && echo yes || echo NO))"
    fi
    echo "ceph-smoke: starting the monitor again with ceph.sh"
    bash "$HERE/ceph.sh" >"$TMP/ceph-restart.log" 2>&1 && pass "ceph.sh restarted mon.a: $(grep -E '^timing' "$TMP/ceph-restart.log")" \
      || { cat "$TMP/ceph-restart.log"; fail "ceph.sh could not restart the cluster"; }
    for _ in $(seq 1 120); do grep -q '^rc=' "$TMP/down.out" 2>/dev/null && break; sleep 1; done
    note "mon-down domain start, after the mon came back: $(tr -s '\n' ' ' <"$TMP/down.out" 2>/dev/null)"
    wait "$downpid" 2>/dev/null
    V destroy "$NAME-down" >/dev/null 2>&1
    V pool-start "$LPOOL" >/dev/null 2>&1 || V pool-refresh "$LPOOL" >/dev/null 2>&1 || fail "pool does not start again after mon restart"
  else
    fail "mon.a pid file missing: cannot test the unreachable cluster"
  fi
fi

# ---- teardown through libvirt ----
if [ "$CLONE" != "$VOL" ]; then
  V vol-delete "$CLONE" --pool "$LPOOL" >/dev/null && pass "vol-delete $CLONE" || fail "vol-delete $CLONE failed"
fi
if V vol-delete "$VOL" --pool "$LPOOL" >/dev/null 2>"$TMP/del.err"; then
  pass "vol-delete $VOL"
else
  note "vol-delete $VOL without --delete-snapshots: $(tr '\n' ' ' <"$TMP/del.err")"
  V vol-delete "$VOL" --pool "$LPOOL" --delete-snapshots >/dev/null && pass "vol-delete $VOL --delete-snapshots" \
    || fail "vol-delete $VOL --delete-snapshots failed"
fi
V pool-destroy "$LPOOL" >/dev/null && V pool-undefine "$LPOOL" >/dev/null && pass "pool destroyed and undefined" || fail "pool teardown failed"
V secret-undefine "$SECRET_UUID" >/dev/null && pass "secret undefined" || fail "secret-undefine failed"
if ls_out=$(R ls 2>&1); then
  [ -z "$ls_out" ] && pass "rbd ls $POOL is empty" || fail "rbd ls $POOL: $(tr '\n' ' ' <<<"$ls_out")"
else
  fail "rbd ls $POOL failed: $(tr '\n' ' ' <<<"$ls_out")"
fi
