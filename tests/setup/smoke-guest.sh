#!/usr/bin/env bash
# Manual end-to-end check of the test guest on this host (what the Rust
# integration tests do too): boots tests/setup/guest.sh's image as a transient
# TCG domain with a NoCloud seed (meta-data, user-data, and vendor-data laid
# out like the driver's), a read-only 9p share and a NIC on network "default",
# then checks console markers, DHCP lease, HTTP, runcmd, 9p and graceful ACPI
# shutdown. Cleans up on exit.
#
# Usage: tests/setup/smoke-guest.sh [IMAGE]   (default /var/lib/nomad-driver-virt-test/guest.qcow2)
# Env:   BOOT_TIMEOUT=120  SHUTDOWN_TIMEOUT=30  KEEP=1 (keep temp dir for debugging)
#        SMOKE_IGNORE_ACPI=1: the guest gets "touch /run/no-acpi" in runcmd; then
#        checks instead that virsh shutdown is ignored (domain still running
#        after 10 s, "GUEST-ACPI: power button ignored" on the console), and
#        destroys it.
# Prereqs: tests/setup/host.sh and tests/setup/guest.sh have been run.
set -uo pipefail

IMAGE=${1:-/var/lib/nomad-driver-virt-test/guest.qcow2}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-120}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-30}
IGNORE_ACPI=${SMOKE_IGNORE_ACPI:-0}
URI=qemu:///system
V() { virsh -q -c "$URI" "$@"; }

PASSED=0; FAILED=0
pass() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
die()  { echo "FAIL: $*"; FAILED=$((FAILED + 1)); finish; }
finish() {
  echo "smoke-guest: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] && exit 0 || exit 1
}

[ "$(id -u)" -eq 0 ] || { echo "smoke-guest: must run as root" >&2; exit 2; }
[ -f "$IMAGE" ] || { echo "smoke-guest: no image $IMAGE (run tests/setup/guest.sh)" >&2; exit 2; }
for c in virsh genisoimage qemu-img curl; do
  command -v "$c" >/dev/null || { echo "smoke-guest: missing $c (run tests/setup/host.sh)" >&2; exit 2; }
done

NAME=ndvtest-smoke-$$-$RANDOM
# qemu runs as libvirt-qemu: the directory must be traversable (mktemp -d is 0700).
TMP=$(mktemp -d /tmp/ndvtest-smoke.XXXXXX); chmod 0755 "$TMP"
MAC=$(printf '52:54:00:%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
CONSOLE=$TMP/console.log

cleanup() {
  if V dominfo "$NAME" >/dev/null 2>&1; then
    V destroy "$NAME" >/dev/null 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "smoke-guest: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- seed ISO (NoCloud) ----
mkdir -p "$TMP/seed" "$TMP/alloc"
cat >"$TMP/seed/meta-data" <<'MD'
instance-id: smoke
local-hostname: smoke-guest
MD
# Like the driver: its own settings in vendor-data (double-quoted scalars),
# the user's cloud-config in user-data, whose keys replace vendor-data's.
cat >"$TMP/seed/vendor-data" <<'VD'
#cloud-config
hostname: "smoke-guest"
bootcmd:
  - "mkdir -p /alloc && mount -t 9p -o trans=virtio,version=9p2000.L,ro 'alloc' '/alloc'"
runcmd:
  - "echo vendor-runcmd-must-be-overridden"
write_files:
  - path: "/www/vendor.txt"
    permissions: "0644"
    content: "from \"vendor\" write_files\n"
VD
cat >"$TMP/seed/user-data" <<'UD'
#cloud-config
runcmd:
  - echo hello-from-runcmd > /www/runcmd.txt
  - cat /alloc/hello.txt
  - [ "sh", "-c", "echo array-form-$((40 + 2))" ]
  - |
    echo block-line-1
    echo block-line-2
UD
if [ "$IGNORE_ACPI" = 1 ]; then echo '  - touch /run/no-acpi' >>"$TMP/seed/user-data"; fi
genisoimage -quiet -output "$TMP/seed.iso" -volid cidata -joliet -rock \
  "$TMP/seed/meta-data" "$TMP/seed/user-data" "$TMP/seed/vendor-data" || die "genisoimage failed"
echo "hello-from-9p-share" >"$TMP/alloc/hello.txt"
chmod 0755 "$TMP/alloc"; chmod 0644 "$TMP/alloc/hello.txt" "$TMP/seed.iso"

# ---- overlay disk ----
qemu-img create -q -f qcow2 -b "$IMAGE" -F qcow2 "$TMP/disk.qcow2" || die "qemu-img create overlay failed"
chmod 0644 "$TMP/disk.qcow2"

cat >"$TMP/domain.xml" <<XML
<domain type='qemu'>
  <name>$NAME</name>
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
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$TMP/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='$TMP/seed.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <filesystem type='mount' accessmode='mapped'>
      <source dir='$TMP/alloc'/>
      <target dir='alloc'/>
      <readonly/>
    </filesystem>
    <interface type='network'>
      <mac address='$MAC'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$CONSOLE'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='$CONSOLE'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
XML

echo "smoke-guest: domain $NAME, mac $MAC, dir $TMP"
t0=$(date +%s.%N)
V create "$TMP/domain.xml" >/dev/null || die "virsh create failed"
pass "domain $NAME created (type qemu/TCG)"

# ---- wait for GUEST-READY ----
ready=0; t_init=
elapsed() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN{printf "%.1f", a-b}'; }
deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  if [ -z "$t_init" ] && grep -q '^GUEST-BOOT' "$CONSOLE" 2>/dev/null; then t_init=$(elapsed "$t0"); fi
  if grep -q '^GUEST-READY' "$CONSOLE" 2>/dev/null; then ready=1; break; fi
  V dominfo "$NAME" >/dev/null 2>&1 || break
  sleep 0.5
done
boot=$(elapsed "$t0")
echo "---- console ----"; tr -d '\r' <"$CONSOLE" 2>/dev/null | sed 's/^/  | /'; echo "-----------------"
if [ "$ready" = 1 ]; then
  pass "GUEST-READY after ${boot}s (/init started after ${t_init:-?}s; load: $(cut -d' ' -f1-3 /proc/loadavg))"
else
  die "no GUEST-READY within ${BOOT_TIMEOUT}s"
fi
con=$(tr -d '\r' <"$CONSOLE")

grep -qx 'GUEST-HOSTNAME: smoke-guest' <<<"$con" && pass "hostname from meta-data" || fail "hostname marker missing"
grep -qx 'hello-from-9p-share' <<<"$con" && pass "9p share read by runcmd (cat /alloc/hello.txt)" || fail "9p file content not on console"
grep -qx 'array-form-42' <<<"$con" && pass "runcmd array form" || fail "runcmd array form output missing"
grep -qx 'block-line-2' <<<"$con" && pass "runcmd block item" || fail "runcmd block item output missing"
grep -q 'vendor-runcmd-must-be-overridden' <<<"$con" && fail "vendor-data runcmd ran although user-data has runcmd" \
  || pass "user-data runcmd replaced vendor-data runcmd"
grep -q "^GUEST-BOOTCMD\[001\] exit=0" <<<"$con" && pass "vendor-data bootcmd (9p mount) exit=0" || fail "vendor-data bootcmd failed"
if grep -q '^GUEST-WARN' <<<"$con"; then fail "guest printed warnings"; fi
guest_ip=$(sed -n 's/^GUEST-IP: //p' <<<"$con" | head -n1)

# ---- DHCP lease by MAC ----
lease_ip=
for _ in $(seq 1 20); do
  lease_ip=$(V net-dhcp-leases default --mac "$MAC" 2>/dev/null | awk '$4 ~ /ipv4/ {sub(/\/.*/, "", $5); print $5; exit}')
  [ -n "$lease_ip" ] && break
  sleep 0.5
done
if [ -n "$lease_ip" ]; then
  pass "lease for $MAC: $lease_ip (guest says $guest_ip)"
  [ "$lease_ip" = "$guest_ip" ] || fail "lease ip $lease_ip != GUEST-IP $guest_ip"
  V net-dhcp-leases default --mac "$MAC" | grep -q 'smoke-guest' && pass "lease records hostname smoke-guest" \
    || fail "lease has no hostname: $(V net-dhcp-leases default --mac "$MAC")"
else
  fail "no DHCP lease for $MAC"
fi

# ---- HTTP (guest on the libvirt bridge only) ----
if [ -n "$lease_ip" ]; then
  body=$(curl -sS --max-time 10 "http://$lease_ip:8080/" 2>&1)
  [ "$body" = "smoke-guest" ] && pass "GET / -> '$body'" || fail "GET / -> '$body'"
  body=$(curl -sS --max-time 10 "http://$lease_ip:8080/runcmd.txt" 2>&1)
  [ "$body" = "hello-from-runcmd" ] && pass "GET /runcmd.txt -> '$body'" || fail "GET /runcmd.txt -> '$body'"
  body=$(curl -sS --max-time 10 "http://$lease_ip:8080/vendor.txt" 2>&1)
  [ "$body" = 'from "vendor" write_files' ] && pass "vendor-data write_files: GET /vendor.txt -> '$body'" || fail "vendor-data write_files: GET /vendor.txt -> '$body'"
fi

# ---- graceful shutdown via ACPI (or: ACPI ignored) ----
t1=$(date +%s.%N)
V shutdown "$NAME" --mode acpi >/dev/null || fail "virsh shutdown failed"
if [ "$IGNORE_ACPI" = 1 ]; then
  sleep 10
  V dominfo "$NAME" >/dev/null 2>&1 && pass "guest with /run/no-acpi still running 10s after virsh shutdown" \
    || fail "guest with /run/no-acpi went away after virsh shutdown"
  grep -q 'GUEST-ACPI: power button ignored' "$CONSOLE" && pass "guest logged ACPI ignored" || fail "no 'GUEST-ACPI: power button ignored' marker"
  V destroy "$NAME" >/dev/null 2>&1 && pass "virsh destroy" || fail "virsh destroy failed"
else
  gone=0
  deadline=$(( $(date +%s) + SHUTDOWN_TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    V dominfo "$NAME" >/dev/null 2>&1 || { gone=1; break; }
    sleep 0.5
  done
  sd=$(elapsed "$t1")
  if [ "$gone" = 1 ]; then pass "ACPI shutdown: transient domain gone after ${sd}s"; else fail "domain still there ${SHUTDOWN_TIMEOUT}s after virsh shutdown"; fi
  grep -q 'GUEST-ACPI: power button -> poweroff' "$CONSOLE" && pass "guest logged ACPI poweroff" || fail "no GUEST-ACPI marker"
fi

finish
