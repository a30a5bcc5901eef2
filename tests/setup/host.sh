#!/usr/bin/env bash
# Host setup for nomad-driver-virt end-to-end tests (Debian 12, run as root,
# no systemd required). Idempotent: re-running is fast when everything is
# already installed and running.
#
#   - installs libvirt + QEMU (bookworm's 7.2, downgrading a backports
#     qemu-utils if present) and the tools the test guest build needs;
#   - starts virtlogd and libvirtd if they are not running;
#   - waits until qemu:///system answers;
#   - makes sure libvirt network "default" (virbr0) is defined and active.
#
# Usage: sudo tests/setup/host.sh
# Env:   HOST_SETUP_FORCE_INSTALL=1  always run apt-get (skip the fast path)
#        LIBVIRT_WAIT_SECS=60        how long to wait for libvirtd to answer
set -euo pipefail

die() { echo "host.sh: ERROR: $*" >&2; exit 1; }
log() { echo "host.sh: $*"; }
trap 'echo "host.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

export DEBIAN_FRONTEND=noninteractive
URI=qemu:///system
WAIT_SECS=${LIBVIRT_WAIT_SECS:-60}

# Packages installed at whatever version apt picks.
PKGS=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 dnsmasq-base iptables iproute2 genisoimage curl libxml2-utils cloud-init dnsmasq-utils
  acl  # setfacl: tests/e2e_shares.rs grants QEMU's user an ACL
  # prlimit: the driver runs qemu-img under CPU and memory limits
  util-linux
  # mkfs.xfs: reflink copies are tested on an XFS loop file
  xfsprogs
  # guest image build (tests/setup/guest.sh)
  grub-pc-bin grub-common xorriso mtools cpio gzip xz-utils
)
# Packages that must be at the same version as qemu-system-x86.
QEMU_PINNED=(qemu-utils qemu-block-extra)

installed_version() { # prints version if package is fully installed
  dpkg-query -W -f='${db:Status-Abbrev}|${Version}\n' "$1" 2>/dev/null \
    | awk -F'|' '$1 ~ /^ii/ {print $2}'
}

all_present() {
  local p qv v
  for p in "${PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || { log "missing package: $p"; return 1; }
  done
  qv=$(installed_version qemu-system-x86)
  for p in "${QEMU_PINNED[@]}"; do
    v=$(installed_version "$p")
    [ "$v" = "$qv" ] || { log "package $p is '${v:-absent}', wants '$qv' (qemu-system-x86's)"; return 1; }
  done
  local b
  for b in virsh libvirtd virtlogd qemu-system-x86_64 qemu-img prlimit grub-mkrescue xorriso genisoimage curl iptables ip setfacl mkfs.xfs; do
    command -v "$b" >/dev/null || { log "missing command: $b"; return 1; }
  done
  return 0
}

# The bookworm (non-backports) version of qemu-system-x86: highest version
# listed by apt-cache madison that is not from a *-backports suite.
bookworm_qemu_version() {
  apt-cache madison qemu-system-x86 \
    | awk -F'|' '{gsub(/^ +| +$/,"",$2); gsub(/^ +| +$/,"",$3);
                  if ($3 !~ /backports/ && $2 !~ /bpo/) print $2}' \
    | sort -u | sort -V -r | head -n1 || true
}

has_version() { # pkg version -> 0 if apt knows that exact version
  local vs; vs=$(apt-cache madison "$1" | awk -F'|' '{gsub(/ /,"",$2); print $2}')
  grep -qxF "$2" <<<"$vs"
}

t0=$(date +%s)
if [ "${HOST_SETUP_FORCE_INSTALL:-0}" != 1 ] && all_present; then
  log "packages: all present (fast path, no apt-get)"
else
  log "apt-get update"
  apt-get update -qq || die "apt-get update failed"
  QV=$(bookworm_qemu_version)
  [ -n "$QV" ] || die "could not determine bookworm version of qemu-system-x86 (apt-cache madison empty?)"
  log "bookworm qemu version: $QV"
  pinned_args=()
  for p in "${QEMU_PINNED[@]}"; do
    has_version "$p" "$QV" || die "apt has no $p=$QV (needed to match qemu-system-x86); see 'apt-cache policy $p'"
    pinned_args+=("$p=$QV")
  done
  log "apt-get install ${PKGS[*]} qemu-system-x86=$QV ${pinned_args[*]}"
  apt-get install -y -q --no-install-recommends --allow-downgrades \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${PKGS[@]}" "qemu-system-x86=$QV" "${pinned_args[@]}" \
    || die "apt-get install failed"
  all_present || die "packages still missing after apt-get install"
fi

# ---- virtiofsd (virtiofs shares) ----
# libvirt finds it through a vhost-user descriptor of type "fs": Debian 12's
# qemu-system-common ships /usr/lib/qemu/virtiofsd with one; newer Debian
# has it in the virtiofsd package.
has_virtiofsd() { grep -qsE '"type"[[:space:]]*:[[:space:]]*"fs"' /etc/qemu/vhost-user/*.json /usr/share/qemu/vhost-user/*.json; }
if ! has_virtiofsd; then
  if apt-cache show virtiofsd >/dev/null 2>&1; then
    log "apt-get install virtiofsd"
    apt-get install -y -q --no-install-recommends virtiofsd || die "apt-get install virtiofsd failed"
  fi
  has_virtiofsd || die "no virtiofsd for libvirt (no vhost-user descriptor of type fs); virtiofs tests need it"
fi
t1=$(date +%s)

# ---- /dev/kvm permissions ----
# Without udev, /dev/kvm stays root:root 0600. libvirt probes QEMU with KVM
# enabled (as root) but then checks /dev/kvm as the libvirt-qemu user, finds
# it "not available now", drops its capabilities cache and re-probes QEMU on
# EVERY call that needs capabilities (virsh version, domcapabilities, domain
# start): ~4-8 s each. Give /dev/kvm the group/mode Debian's udev rule gives
# it (root:kvm 0660) so the cache stays valid. Note: libvirt then advertises
# domain type 'kvm' as available, but nested KVM hangs on these machines, so
# tests must still ask for type 'qemu' (TCG) explicitly.
# Set HOST_SETUP_KVM_PERMS=0 to leave /dev/kvm alone.
if [ "${HOST_SETUP_KVM_PERMS:-1}" = 1 ] && [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  if [ "$(stat -c '%G %a' /dev/kvm)" != "kvm 660" ]; then
    log "setting /dev/kvm to root:kvm 0660 (as udev would)"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || die "could not fix /dev/kvm permissions"
  fi
fi

# ---- daemons (no systemd) ----
mkdir -p /var/log/libvirt /run/libvirt
if ! pidof virtlogd >/dev/null; then
  log "starting virtlogd"
  virtlogd -d </dev/null >/dev/null 2>&1 || die "virtlogd -d failed"
fi
if ! pidof libvirtd >/dev/null; then
  log "starting libvirtd"
  libvirtd -d </dev/null >/dev/null 2>&1 || die "libvirtd -d failed (see /var/log/libvirt/)"
fi

deadline=$(( $(date +%s) + WAIT_SECS ))
until virsh -c "$URI" version >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    virsh -c "$URI" version >&2 || true
    die "libvirtd did not answer on $URI within ${WAIT_SECS}s (pidof libvirtd: '$(pidof libvirtd || true)')"
  fi
  sleep 0.5
done
pidof virtlogd >/dev/null || die "virtlogd is not running (domain start would fail: /run/libvirt/virtlogd-sock)"

# ---- network "default" ----
if ! virsh -c "$URI" net-info default >/dev/null 2>&1; then
  xml=/usr/share/libvirt/networks/default.xml
  [ -f "$xml" ] || die "network 'default' is not defined and $xml is missing"
  log "defining network default from $xml"
  virsh -c "$URI" net-define "$xml" >/dev/null || die "virsh net-define $xml failed"
fi
virsh -c "$URI" net-autostart default >/dev/null 2>&1 || true
# (no `virsh ... | grep -q`: with pipefail, grep -q closing the pipe early
#  can make the pipeline fail through SIGPIPE)
net_active() { local info; info=$(virsh -c "$URI" net-info default 2>/dev/null) || return 1
  grep -Eq '^Active:[[:space:]]+yes' <<<"$info"; }
if ! net_active; then
  log "starting network default"
  virsh -c "$URI" net-start default || die "virsh net-start default failed (iptables/dnsmasq problem?)"
fi
net_active || die "network default is not active"
bridge=$(virsh -c "$URI" net-info default | awk '/^Bridge:/ {print $2}')
ip link show "$bridge" >/dev/null 2>&1 || die "bridge '$bridge' of network default does not exist"

# ---- summary ----
kvm=no; [ -r /dev/kvm ] && kvm="present (nested KVM may not work here; tests use TCG, domain type 'qemu')"
echo "---- host setup summary ----"
echo "libvirt:   $(virsh -c "$URI" version 2>/dev/null | awk -F': ' '/Using library/ {print $2}')"
echo "qemu:      $(qemu-system-x86_64 --version | head -n1)"
echo "qemu-img:  $(qemu-img --version | head -n1)"
echo "daemons:   virtlogd pid $(pidof virtlogd), libvirtd pid $(pidof libvirtd)"
echo "network:   default active, bridge $bridge $(ip -4 -o addr show "$bridge" | awk '{print $4}')"
echo "/dev/kvm:  $kvm"
echo "timing:    packages $((t1 - t0))s, total $(( $(date +%s) - t0 ))s"
echo "host.sh: OK"
