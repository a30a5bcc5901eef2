#!/usr/bin/env bash
# Builds the tiny nomad-driver-virt test guest: a bootable qcow2 "cloud image"
# made from Debian's kernel + busybox-static, with a minimal cloud-init in /init.
#
# Usage: tests/setup/guest.sh [OUTDIR]        (default /var/lib/nomad-driver-virt-test)
#   -> OUTDIR/guest.qcow2   (~25 MB, BIOS-bootable hybrid ISO converted to qcow2)
#      OUTDIR/guest.version (cache key: sha256 of this script + versions of the
#                            kernel, busybox and the agent/script packages)
# Skips the build when guest.version matches. GUEST_FORCE_REBUILD=1 forces it.
# Needs root (apt-get download, mknod) and the packages from tests/setup/host.sh.
#
# ------------------------------------------------------------------------------
# Guest conventions (what tests can rely on)
#   Boot: kernel "console=ttyS0 quiet"; all guest output goes to the serial
#   console (ttyS0). Console marker lines, in order:
#     GUEST-BOOT: <kernel> uptime=<s>s  /init started
#     GUEST-SEED: <dev>|none            NoCloud seed found (mounted ro at /seed)
#     GUEST-HOSTNAME: <name>            hostname set (meta-data local-hostname,
#                                       overridden by cloud-config "hostname:")
#     GUEST-BOOTCMD[NNN]: <cmd>  then  GUEST-BOOTCMD[NNN] exit=<rc>
#     GUEST-WRITE-FILE: <path>
#     GUEST-IP: <ipv4>|none             eth0 DHCP lease (udhcpc keeps renewing)
#     GUEST-IP-ethN: <ipv4>|none        one line per further NIC (eth1, eth2, ...
#                                       in PCI order), right after GUEST-IP
#     GUEST-RUNCMD[NNN]: <cmd>   then  GUEST-RUNCMD[NNN] exit=<rc>
#     GUEST-VENDORSCRIPT exit=<rc> / GUEST-USERSCRIPT exit=<rc>   ("#!" documents)
#     GUEST-UPTIME: <s>s ...            informational (also after GUEST-IP)
#     GUEST-READY                       everything is up; /init then idles forever
#     GUEST-ACPI: power button -> poweroff   /   GUEST-ACPI: power button ignored
#     GUEST-WARN: <text>                something non-fatal went wrong
#   Seed: NoCloud ISO9660 with volume label "cidata" (findfs LABEL=cidata, else
#     any of /dev/sr0 /dev/sr1 /dev/vd? /dev/sd? that mounts as iso9660 and has
#     meta-data or user-data). Waits up to ~15 s for it. vfat seeds unsupported.
#   user-data and vendor-data (the driver puts its bootcmd/runcmd/write_files
#   in vendor-data): each is either
#     - a script starting with "#!": run after runcmd (vendor first) with its
#       interpreter if present in the guest, else with sh; or
#     - otherwise parsed as #cloud-config (a small YAML subset, no MIME/gzip):
#       bootcmd: / runcmd:  list items, each one of
#           - plain string                 -> run with sh
#           - 'single' or "double" quoted  -> unquoted, sh ("..." takes YAML/JSON
#                                             escapes: \" \\ \/ \n \t \r \xXX \uXXXX ...)
#           - [ "arg", 'arg', bare ]       -> one-line flow array, exec form
#                                             (each element shell-quoted)
#           - - arg  /  (newline) - arg    -> block-style nested array, same
#           - |  (indented block)          -> multi-line script, sh
#         also an inline list of strings: runcmd: ["echo a", 'echo b']
#         (no arrays nested inside an inline list)
#       write_files: items with path, content (plain/quoted/| block),
#         permissions, encoding (b64|base64), append (true).
#       hostname: overrides local-hostname.
#     As in cloud-init, a top-level key present in user-data replaces
#     vendor-data's value for that key entirely (lists are not merged).
#     Order: bootcmd (before network) -> write_files -> network -> httpd ->
#     runcmd -> vendor/user script -> GUEST-READY. Each command runs synchronously with
#     `sh FILE </dev/null`, stdout/stderr to the console; end a long-running
#     command with '&'. Commands run as root, cwd /, PATH=/sbin:/bin:/usr/sbin:/usr/bin.
#   9p and virtiofs: the modules 9pnet, 9pnet_virtio, 9p and virtiofs (with
#     fuse) are loaded before bootcmd, so bootcmds like
#       mkdir -p /alloc && mount -t 9p -o trans=virtio,version=9p2000.L,ro alloc /alloc
#       mkdir -p /data && mount -t virtiofs -o ro vol0 /data
#     (busybox mount, TAG as the source) work.
#   Network: lo + eth0; busybox udhcpc -x hostname:<hostname> (dnsmasq records
#     the hostname in the lease); the script applies ip/subnet/router with
#     ifconfig + route. eth0's lease is in /run/guest-ip (a bootcmd that
#     writes it skips the wait, e.g. for a NIC without DHCP behind it).
#     Every further NIC present at boot (eth1, eth2, ...) runs udhcpc too, at
#     the same time and without the hostname; its lease goes to
#     /run/guest-ip-ethN (again, a bootcmd writing it skips the wait). Only
#     eth0 sets the default route and resolv.conf; traffic from ethN's
#     address leaves through ethN (ip rule "from <ip>" -> table 100+N with
#     the subnet and the router), and with several NICs arp_ignore=1 /
#     arp_announce=2, so NICs sharing a subnet each answer for their own
#     address. With one NIC nothing of this runs and boot is unchanged.
#   HTTP: busybox httpd on port 8080 serving /www; /www/index.html contains the
#     hostname (one line). Commands may drop more files into /www.
#   ACPI: busybox acpid handles the power button (virsh shutdown) with
#     `poweroff -f` (~2 s). TO MAKE THE GUEST IGNORE ACPI: create /run/no-acpi
#     (e.g. bootcmd or runcmd item "touch /run/no-acpi"); the handler checks
#     for that file at button time and then only logs "GUEST-ACPI: ... ignored".
#     virsh destroy is then the only way to stop it.
#   Guest agent: qemu-guest-agent (Debian's qemu-ga with its libraries and
#     loader) starts right after the kernel modules load, on the virtio port
#     org.qemu.guest_agent.0 (linked under /dev/virtio-ports/ like udev does),
#     when the domain has that channel. Console marker:
#       GUEST-AGENT: started (pid N) | no port (no agent channel)
#     Its log is /run/qemu-ga.log. guest-shutdown runs /sbin/shutdown, which
#     here does `poweroff -f` (-r: reboot -f, -H: halt -f).
#   TTY: /dev/pts is mounted and util-linux `script` (from bsdutils) is in
#     /usr/bin, so `script -qfec CMD /dev/null` gives a command a pty;
#     busybox provides stty, setsid, mkfifo, dd, timeout.
#   /init is PID 1 and never exits.
# ------------------------------------------------------------------------------
set -euo pipefail

die() { echo "guest.sh: ERROR: $*" >&2; exit 1; }
log() { echo "guest.sh: $*"; }
trap 'echo "guest.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

OUTDIR=${1:-/var/lib/nomad-driver-virt-test}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get download, mknod)"
for c in apt-get apt-cache dpkg cpio gzip grub-mkrescue xorriso qemu-img sha256sum flock; do
  command -v "$c" >/dev/null || die "missing command '$c': run tests/setup/host.sh first"
done
[ -d /usr/lib/grub/i386-pc ] || die "grub-pc-bin is not installed: run tests/setup/host.sh first"

# Modules to load, in this order (dependencies first). Missing dependencies
# are added automatically from each module's .modinfo "depends=" at build time.
WANT_MODULES=(
  virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  failover net_failover virtio_net virtio_blk
  scsi_common scsi_mod cdrom sr_mod libata ata_piix
  libahci ahci virtio_scsi sd_mod          # q35/SATA and virtio-scsi seeds/disks
  isofs netfs fscache 9pnet 9pnet_virtio 9p
  virtiofs                                 # virtiofs shares (pulls in fuse)
  evdev button
  virtio_console                           # the guest agent's virtio-serial port
)

# Userland from Debian packages beyond busybox: the guest agent and util-linux
# `script` (pty for exec sessions). Their shared libraries come from the
# packages they depend on, resolved at build time.
EXTRA_PKGS=(qemu-guest-agent bsdutils)
EXTRA_BINS=(usr/sbin/qemu-ga usr/bin/script)

# One apt-cache call (apt's binary cache may be disabled, making each call slow):
# prints "KPKG KVER BBVER" from the candidates of linux-image-amd64 and busybox-static.
resolve_pkgs() {
  apt-cache show --no-all-versions linux-image-amd64 busybox-static 2>/dev/null | awk '
    /^Package: / { pkg = $2 }
    pkg == "linux-image-amd64" && /^Depends: / && !kpkg {
      if (match($0, /linux-image-[0-9][^ ,]*-amd64 \(= [^)]*\)/)) {
        split(substr($0, RSTART, RLENGTH), a, /[ ()=]+/); kpkg = a[1]; kver = a[2]
      }
    }
    pkg == "busybox-static" && /^Version: / && !bbver { bbver = $2 }
    END { if (kpkg && kver && bbver) print kpkg, kver, bbver }' || true
}
PKGS=$(resolve_pkgs)
if [ -z "$PKGS" ]; then
  log "apt-cache cannot resolve linux-image-amd64/busybox-static; running apt-get update"
  apt-get update -qq || die "apt-get update failed"
  PKGS=$(resolve_pkgs)
fi
[ -n "$PKGS" ] || die "cannot resolve the kernel package (apt-cache show linux-image-amd64) or busybox-static"
read -r KPKG KVER BBVER <<<"$PKGS"

# The extra packages plus their (recursive) library dependencies, with the
# candidate versions: "name=version ..." sorted, part of the cache key.
resolve_extra() {
  local names
  names=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
            --no-breaks --no-replaces --no-enhances --no-pre-depends "${EXTRA_PKGS[@]}" 2>/dev/null \
          | grep -v '^ ' | grep -E "^(lib|$(IFS='|'; echo "${EXTRA_PKGS[*]}")\$)" | sort -u) || return 0
  [ -n "$names" ] || return 0
  # shellcheck disable=SC2086
  apt-cache show --no-all-versions $names 2>/dev/null | awk '
    /^Package: / { pkg = $2 } /^Version: / && pkg { print pkg "=" $2; pkg = "" }' | sort -u
}
EXTRA=$(resolve_extra | tr '\n' ' ')
[ -n "$EXTRA" ] || die "cannot resolve ${EXTRA_PKGS[*]} and their libraries (apt-cache depends)"
for p in "${EXTRA_PKGS[@]}"; do
  case " $EXTRA" in *" $p="*) ;; *) die "package $p not found by apt-cache" ;; esac
done
KEY="script=$(sha256sum "$SELF" | cut -d' ' -f1) kernel=$KPKG=$KVER busybox=$BBVER extra=${EXTRA% }"

IMG=$OUTDIR/guest.qcow2
VERFILE=$OUTDIR/guest.version
up_to_date() { [ -f "$IMG" ] && [ -f "$VERFILE" ] && [ "$(cat "$VERFILE")" = "$KEY" ]; }

if [ "${GUEST_FORCE_REBUILD:-0}" != 1 ] && up_to_date; then
  log "up to date: $IMG ($KEY)"
  exit 0
fi

mkdir -p "$OUTDIR"
chmod 0755 "$OUTDIR"
exec 9>"$OUTDIR/.build.lock"
flock -w 600 9 || die "timed out waiting for another guest.sh build ($OUTDIR/.build.lock)"
if [ "${GUEST_FORCE_REBUILD:-0}" != 1 ] && up_to_date; then
  log "up to date (built concurrently): $IMG"
  exit 0
fi

t0=$(date +%s)
WORK=$(mktemp -d /tmp/ndv-guest-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
log "building in $WORK: $KPKG=$KVER busybox-static=$BBVER"

cd "$WORK"
apt-get download -q -o APT::Sandbox::User=root "$KPKG=$KVER" "busybox-static=$BBVER" >/dev/null \
  || die "apt-get download $KPKG busybox-static failed"
dpkg -x "$(ls "$WORK"/linux-image-*.deb)" "$WORK/kernel"
dpkg -x "$(ls "$WORK"/busybox-static_*.deb)" "$WORK/bb"
KREL=$(ls "$WORK/kernel/lib/modules")
[ -d "$WORK/kernel/lib/modules/$KREL/kernel" ] || die "no modules in $KPKG"
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-*)
BUSYBOX=$WORK/bb/bin/busybox
[ -x "$BUSYBOX" ] || die "busybox-static has no bin/busybox"

# ---------------- initramfs tree ----------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc/acpi,lib/modules,lib/cloud,var/log,var/run,www,seed,root,mnt}
cp "$BUSYBOX" "$R/bin/busybox"
"$BUSYBOX" --list-full | while read -r a; do
  [ "$a" = bin/busybox ] && continue
  case "$a" in */modprobe|*/depmod) continue ;; esac  # no modules.dep here
  ln -sf /bin/busybox "$R/$a"
done
[ -L "$R/bin/sh" ] || die "busybox has no sh applet"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

# ---- guest agent and `script`, with exactly the libraries the loader picks ----
mkdir -p "$WORK/extra-debs" "$WORK/extra"
# shellcheck disable=SC2086
(cd "$WORK/extra-debs" && apt-get download -q -o APT::Sandbox::User=root $EXTRA >/dev/null) \
  || die "apt-get download $EXTRA failed"
for deb in "$WORK"/extra-debs/*.deb; do dpkg -x "$deb" "$WORK/extra"; done
X=$WORK/extra
LOADER=$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -x "$LOADER" ] || die "no loader in the extracted libc6 ($LOADER)"
LIBPATH=$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu
mkdir -p "$R/lib/x86_64-linux-gnu" "$R/lib64"
cp -L "$LOADER" "$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$R/lib64/ld-linux-x86-64.so.2"
for b in "${EXTRA_BINS[@]}"; do
  [ -x "$X/$b" ] || die "$b is not in ${EXTRA_PKGS[*]}"
  cp "$X/$b" "$R/$b"
  # The extracted loader lists what it would load, from the extracted tree only
  # (it runs nothing of the binary).
  list=$("$LOADER" --library-path "$LIBPATH" --list "$X/$b") || die "cannot resolve the libraries of $b"
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    case "$soname" in */*) continue ;; esac   # the loader itself, copied above
    case "$path" in
      "$X"/*) cp -L "$path" "$R/lib/x86_64-linux-gnu/$soname" ;;
      *) die "$b needs $soname, which resolved outside the extracted packages: $path" ;;
    esac
  done <<<"$list"
done
log "guest agent + script: $(ls "$R/lib/x86_64-linux-gnu" | wc -l) libraries"

# guest-shutdown runs /sbin/shutdown -P|-H|-r +0 "message"; there is no init
# system to ask, so act at once.
cat >"$R/sbin/shutdown" <<'EOF'
#!/bin/sh
echo "GUEST-SHUTDOWN: $*" >/dev/console
sync
case " $* " in
  *" -r "*) reboot -f ;;
  *" -H "*) halt -f ;;
  *) poweroff -f ;;
esac
EOF
chmod 755 "$R/sbin/shutdown"

# Kernel modules: resolve dependencies (depth-first) from .modinfo depends=.
MODSRC=$WORK/kernel/lib/modules/$KREL
declare -A MODPATH=() LOADED=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%%.ko*}; n=${n//-/_}
  MODPATH[$n]=$f
done < <(find "$MODSRC" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
ORDER=()
add_module() { # name [chain]
  local n=${1//-/_} f deps d
  [ -n "${LOADED[$n]:-}" ] && return 0
  f=${MODPATH[$n]:-}
  [ -n "$f" ] || die "kernel module $n not found in $KPKG (needed by: ${2:-list})"
  LOADED[$n]=1
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$R/lib/modules/$n.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$R/lib/modules/$n.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$R/lib/modules/$n.ko" ;;
    *) cp "$f" "$R/lib/modules/$n.ko" ;;
  esac
  deps=$(tr '\0' '\n' <"$R/lib/modules/$n.ko" | sed -n 's/^depends=//p' | head -n1)
  for d in ${deps//,/ }; do add_module "$d" "$n"; done
  ORDER+=("$n")
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/load-order"
log "modules (${#ORDER[@]}): ${ORDER[*]}"

cat >"$R/lib/cloud/parse.awk" <<'AWK'
# Minimal cloud-config parser (busybox awk). Usage:
#   awk -v out=DIR -f parse.awk user-data
# Writes DIR/bootcmd/NNN, DIR/runcmd/NNN (one shell snippet per item),
# DIR/write_files/NNN.{path,content,perm,enc,append}, DIR/hostname and
# DIR/keys (the top-level keys seen, for user-data over vendor-data merging).
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
function indent_of(s) { match(s, /^[ \t]*/); return RLENGTH }
function hexval(h,   i, v, c) {
  v = 0; h = tolower(h)
  for (i = 1; i <= length(h); i++) {
    c = index("0123456789abcdef", substr(h, i, 1)) - 1
    if (c < 0) return -1
    v = v * 16 + c
  }
  return v
}
function utf8(n) {
  if (n <= 0) return ""      # NUL cannot be represented: dropped
  if (n < 128) return sprintf("%c", n)
  if (n < 2048) return sprintf("%c%c", 192 + int(n / 64), 128 + n % 64)
  if (n < 65536) return sprintf("%c%c%c", 224 + int(n / 4096), 128 + int(n / 64) % 64, 128 + n % 64)
  return sprintf("%c%c%c%c", 240 + int(n / 262144), 128 + int(n / 4096) % 64, 128 + int(n / 64) % 64, 128 + n % 64)
}
function dq(s,   r, i, n, ch, w) {   # body of a double-quoted YAML/JSON string
  r = ""; n = length(s)
  for (i = 1; i <= n; i++) {
    ch = substr(s, i, 1)
    if (ch == "\\" && i < n) {
      i++; ch = substr(s, i, 1); w = 0
      if (ch == "n") ch = "\n"; else if (ch == "t") ch = "\t"
      else if (ch == "r") ch = "\r"; else if (ch == "0") ch = ""
      else if (ch == "b") ch = "\b"; else if (ch == "f") ch = "\f"
      else if (ch == "e") ch = sprintf("%c", 27); else if (ch == "a") ch = sprintf("%c", 7)
      else if (ch == "v") ch = sprintf("%c", 11)
      else if (ch == "x") w = 2; else if (ch == "u") w = 4; else if (ch == "U") w = 8
      if (w) { ch = utf8(hexval(substr(s, i + 1, w))); i += w }
    }
    r = r ch
  }
  return r
}
function scalar(s,   c, i, n, ch) {   # YAML one-line scalar -> string
  s = trim(s); c = substr(s, 1, 1); n = length(s)
  if (c == "\"") {          # up to the first unescaped closing quote
    for (i = 2; i <= n; i++) {
      ch = substr(s, i, 1)
      if (ch == "\\") i++
      else if (ch == "\"") break
    }
    return dq(substr(s, 2, i - 2))
  }
  if (c == "'") {            # '' is an escaped quote
    for (i = 2; i <= n; i++) {
      if (substr(s, i, 1) == "'") { if (substr(s, i + 1, 1) == "'") i++; else break }
    }
    s = substr(s, 2, i - 2); gsub(/''/, "'", s); return s
  }
  sub(/[ \t]+#.*$/, "", s)
  return s
}
function shq(s) { gsub(/'/, "'\\''", s); return "'" s "'" }
function flow_items(s, items,   cnt, i, n, ch, tok, q, have, closed) {  # [a, "b", 'c'] -> items[1..cnt]
  s = trim(s); sub(/^\[/, "", s); sub(/\][ \t]*(#.*)?$/, "", s)
  cnt = 0; tok = ""; q = ""; have = 0; closed = 0; n = length(s)
  for (i = 1; i <= n; i++) {
    ch = substr(s, i, 1)
    if (q == "\"") {
      if (ch == "\\" && i < n) { tok = tok ch substr(s, i + 1, 1); i++ }
      else if (ch == "\"") { q = ""; closed = 1; tok = dq(tok) } else tok = tok ch
      continue
    }
    if (q == "'") {
      if (ch == "'") {
        if (substr(s, i + 1, 1) == "'") { tok = tok "'"; i++ } else { q = ""; closed = 1 }
      } else tok = tok ch
      continue
    }
    if (ch == ",") {
      if (have) items[++cnt] = closed ? tok : trim(tok)
      tok = ""; have = 0; closed = 0; continue
    }
    if (closed) continue
    if ((ch == "\"" || ch == "'") && trim(tok) == "") { q = ch; have = 1; tok = ""; continue }
    if ((ch == " " || ch == "\t") && !have) continue
    tok = tok ch; have = 1
  }
  if (have) items[++cnt] = closed ? tok : trim(tok)
  return cnt
}
function flow(s,   items, cnt, i, r) {  # [a, "b"] -> shell words (exec form)
  cnt = flow_items(s, items); r = ""
  for (i = 1; i <= cnt; i++) r = r (i > 1 ? " " : "") shq(items[i])
  return r
}
function emit_cmd(sect, text,   f) {
  ncmd[sect]++
  f = out "/" sect "/" sprintf("%03d", ncmd[sect])
  printf "%s\n", text > f; close(f)
}
function wf_attr(k, v,   f) {
  f = out "/write_files/" sprintf("%03d", nwf) "." k
  printf "%s", v > f; close(f)
}
function block_start(kind, style, parent) { blk = kind; blk_style = style; blk_parent = parent; blk_strip = -1; blk_text = "" }
function block_end(   t) {
  t = blk_text
  if (blk_style ~ /-$/) sub(/\n+$/, "", t)
  else { sub(/\n+$/, "", t); t = t "\n" }
  if (blk == "cmd") emit_cmd(sect, t)
  else if (blk == "content") wf_attr("content", t)
  blk = ""
}
function nested_end() { if (nest != "") { emit_cmd(sect, nest); nest = "" } }

BEGIN { sect = ""; blk = ""; nest = ""; nwf = 0 }
{ sub(/\r$/, "") }
# ---- inside a block scalar (| or >) ----
blk != "" {
  if ($0 ~ /^[ \t]*$/) { if (blk_strip >= 0) blk_text = blk_text "\n"; next }
  ind = indent_of($0)
  if (ind > blk_parent) {
    if (blk_strip < 0) blk_strip = ind
    blk_text = blk_text substr($0, blk_strip + 1) "\n"
    next
  }
  block_end()
}
/^[ \t]*(#.*)?$/ { next }
# ---- inside a nested block sequence item ("- - a" / "  - b") ----
nest != "" {
  if (indent_of($0) == nest_indent && match($0, /^[ \t]*-[ \t]+/)) {
    nest = nest " " shq(scalar(substr($0, RLENGTH + 1))); next
  }
  nested_end()
}
# ---- top-level key ----
/^[^ \t-]/ {
  key = $0; sub(/:.*/, "", key); key = trim(key)
  val = $0; sub(/^[^:]*:/, "", val); val = trim(val)
  sect = key
  f = out "/keys"; print key >> f; close(f)
  if (key == "hostname" && val != "") { f = out "/hostname"; printf "%s\n", scalar(val) > f; close(f) }
  if ((key == "runcmd" || key == "bootcmd") && val ~ /^\[/) {   # inline list of strings
    cnt = flow_items(val, items)
    for (i = 1; i <= cnt; i++) emit_cmd(key, items[i])
    sect = ""
  }
  next
}
# ---- runcmd / bootcmd items ----
sect == "runcmd" || sect == "bootcmd" {
  if (!match($0, /^[ \t]*-[ \t]*/)) { print "GUEST-WARN: " sect ": ignored line: " $0 > "/dev/stderr"; next }
  item = substr($0, RLENGTH + 1)
  item_indent = indent_of($0)   # (clobbers RLENGTH)
  if (item ~ /^[|>][-+]?[ \t]*$/) { block_start("cmd", trim(item), item_indent); next }
  if (item ~ /^\[/) { emit_cmd(sect, flow(item)); next }
  if (match(item, /^-[ \t]+/)) {       # "- - arg": block-style array
    nest_indent = item_indent + (length($0) - length(item))
    nest = shq(scalar(substr(item, RLENGTH + 1))); next
  }
  emit_cmd(sect, scalar(item))
  next
}
# ---- write_files ----
sect == "write_files" {
  line = $0; kcol = indent_of($0)
  if (match(line, /^[ \t]*-[ \t]*/)) {
    nwf++
    line = substr(line, RLENGTH + 1)
    kcol = length($0) - length(line)
  } else if (nwf == 0) next
  k = line; sub(/:.*/, "", k); k = trim(k)
  v = line; sub(/^[^:]*:/, "", v); v = trim(v)
  if (k == "content") {
    if (v ~ /^[|>][-+]?$/) { block_start("content", v, kcol); next }
    wf_attr("content", scalar(v))
  } else if (k == "path") wf_attr("path", scalar(v))
  else if (k == "permissions") wf_attr("perm", scalar(v))
  else if (k == "encoding") wf_attr("enc", scalar(v))
  else if (k == "append") wf_attr("append", scalar(v))
  next
}
END { if (blk != "") block_end(); nested_end() }
AWK

cat >"$R/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# busybox udhcpc event script: udhcpc configures nothing by itself.
case "$1" in
  deconfig)
    ifconfig "$interface" 0.0.0.0 up ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"} up
    if [ "$interface" = eth0 ]; then
      # eth0 owns the default route and resolv.conf.
      if [ -n "$router" ]; then
        while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
        for r in $router; do route add default gw "$r" dev "$interface"; break; done
      fi
      : >/etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
      echo "$ip" >/run/guest-ip.tmp && mv /run/guest-ip.tmp /run/guest-ip
    else
      # Another NIC (maybe on eth0's subnet): what leaves from its address
      # leaves through it (source routing in table 100+N), or a filter like
      # libvirt's clean-traffic drops it as spoofed on eth0.
      t=$((100 + ${interface#eth}))
      while ip rule del table "$t" 2>/dev/null; do :; done
      ip route flush table "$t" 2>/dev/null
      eval "$(ipcalc -n -p "$ip" "${subnet:-255.255.255.0}")"
      ip route add "$NETWORK/$PREFIX" dev "$interface" src "$ip" table "$t"
      for r in $router; do ip route add default via "$r" dev "$interface" table "$t"; break; done
      ip rule add from "$ip" table "$t"
    fi
    echo "$ip" >"/run/guest-ip-$interface.tmp" && mv "/run/guest-ip-$interface.tmp" "/run/guest-ip-$interface" ;;
esac
exit 0
EOF
chmod 755 "$R/etc/udhcpc.script"

# busybox acpid: action file maps events to scripts in the conf dir.
printf 'PWRF pwr\nPWRB pwr\n' >"$R/etc/acpid.conf"
cat >"$R/etc/acpi/pwr" <<'EOF'
#!/bin/sh
# Power button (virsh shutdown / ACPI). /run/no-acpi makes the guest ignore it.
if [ -e /run/no-acpi ]; then
  echo "GUEST-ACPI: power button ignored (/run/no-acpi)" >/dev/console
  exit 0
fi
echo "GUEST-ACPI: power button -> poweroff" >/dev/console
sync
poweroff -f
EOF
chmod 755 "$R/etc/acpi/pwr"

printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"

cat >"$R/init" <<'EOF'
#!/bin/sh
# PID 1 of the nomad-driver-virt test guest (built by tests/setup/guest.sh,
# which documents the conventions). Never exits.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=vt100
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
echo /bin/false >/proc/sys/kernel/modprobe 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
echo "GUEST-BOOT: $(uname -r) uptime=$(up)s"

warn() { echo "GUEST-WARN: $*"; }
wait_for() { # tries(0.25s) command...
  _n=$1; shift
  while ! "$@" >/dev/null 2>&1; do
    _n=$((_n - 1)); [ "$_n" -gt 0 ] || return 1
    usleep 250000
  done
}

# ---- kernel modules (virtio, cdrom, 9p, virtiofs, input), dependencies first ----
while read -r m; do
  [ -n "$m" ] || continue
  if ! out=$(insmod "/lib/modules/$m.ko" 2>&1); then
    case "$out" in *"File exists"*) ;; *) warn "insmod $m: $out" ;; esac
  fi
done </lib/modules/load-order

# ---- guest agent ----
# Without udev nothing names the virtio ports: link them like udev's rule
# does, then start qemu-ga on the agent's port if the domain has one.
link_vports() {
  for p in /sys/class/virtio-ports/vport*; do
    [ -r "$p/name" ] || continue
    mkdir -p /dev/virtio-ports
    ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
  done
}
AGENT_PORT=/dev/virtio-ports/org.qemu.guest_agent.0
# virtio device id 3 is the console/serial controller libvirt adds with a channel.
has_vserial() { grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null; }
has_vports() { ls /sys/class/virtio-ports/vport*/name; }
if has_vserial && wait_for 20 has_vports && link_vports && [ -e $AGENT_PORT ]; then
  mkdir -p /run/qemu-ga
  qemu-ga -m virtio-serial -p $AGENT_PORT -t /run/qemu-ga -l /run/qemu-ga.log </dev/null >/dev/null 2>&1 &
  echo "GUEST-AGENT: started (pid $!)"
else
  echo "GUEST-AGENT: no port (no agent channel)"
fi

# ---- NoCloud seed ----
try_seed() { # dev
  [ -b "$1" ] || return 1
  mount -t iso9660 -o ro "$1" /seed 2>/dev/null || return 1
  if [ -f /seed/meta-data ] || [ -f /seed/user-data ]; then SEED=$1; return 0; fi
  umount /seed; return 1
}
find_seed() {
  d=$(findfs LABEL=cidata 2>/dev/null) && try_seed "$d" && return 0
  for d in /dev/sr0 /dev/sr1 /dev/vd? /dev/sd?; do try_seed "$d" && return 0; done
  return 1
}
SEED=
if wait_for 60 find_seed; then echo "GUEST-SEED: $SEED"; else echo "GUEST-SEED: none"; fi

# ---- user-data / vendor-data ----
# Each cloud-config is parsed into its own dir; a top-level key present in
# user-data replaces vendor-data's whole value for that key (cloud-init's
# merge). A "#!" document is a script instead.
C=/run/cloud
SCRIPTS=
for doc in vendor user; do
  mkdir -p $C/$doc/bootcmd $C/$doc/runcmd $C/$doc/write_files
  : >$C/$doc/keys
  f=/seed/$doc-data
  [ -f $f ] || continue
  case "$(head -n1 $f)" in
    '#!'*) cp $f $C/$doc-script; chmod 755 $C/$doc-script; SCRIPTS="$SCRIPTS $doc" ;;
    *) awk -v out=$C/$doc -f /lib/cloud/parse.awk $f || warn "$doc-data parse failed" ;;
  esac
done
src() { if grep -qx "$1" $C/user/keys; then echo $C/user; else echo $C/vendor; fi; }

# ---- hostname ----
HN=
if [ -f /seed/meta-data ]; then
  HN=$(sed -n "s/^[[:space:]\"{,]*local-hostname[\"]*[[:space:]]*:[[:space:]]*[\"']*\([^\"',}[:space:]]*\).*/\1/p" /seed/meta-data | head -n1)
fi
[ -s "$(src hostname)/hostname" ] && HN=$(head -n1 "$(src hostname)/hostname")
HN=${HN:-guest}
hostname "$HN"
echo "$HN" >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$HN" >/etc/hosts
echo "GUEST-HOSTNAME: $HN"

# ---- acpid (power button). Input devices must exist before it starts. ----
if wait_for 20 ls /dev/input/event0; then
  acpid -d -c /etc/acpi -a /etc/acpid.conf >/dev/null 2>&1 &
else
  warn "no /dev/input/event*: acpid not started (virsh shutdown will not work)"
fi

run_list() { # kind LABEL
  for f in $(src $1)/$1/*; do
    [ -f "$f" ] || continue
    n=${f##*/}
    echo "GUEST-$2[$n]: $(cat "$f")"
    (cd / && sh "$f" </dev/null)
    echo "GUEST-$2[$n] exit=$?"
  done
}

run_list bootcmd BOOTCMD

# ---- write_files ----
for p in $(src write_files)/write_files/*.path; do
  [ -f "$p" ] || continue
  b=${p%.path}; path=$(cat "$p")
  mkdir -p "$(dirname "$path")"
  touch $b.content
  case "$(cat $b.enc 2>/dev/null)" in
    b64|base64) base64 -d <$b.content >$b.data || warn "write_files $path: bad base64" ;;
    "") cp $b.content $b.data ;;
    *) warn "write_files $path: unsupported encoding"; cp $b.content $b.data ;;
  esac
  case "$(cat $b.append 2>/dev/null)" in
    true|True|yes) cat $b.data >>"$path" ;;
    *) cat $b.data >"$path" ;;
  esac
  [ -s $b.perm ] && chmod "$(cat $b.perm)" "$path"
  echo "GUEST-WRITE-FILE: $path"
done

# ---- network ----
ifconfig lo 127.0.0.1 netmask 255.0.0.0 up
IP=none
EXTRA_NICS=
if wait_for 40 test -e /sys/class/net/eth0; then
  # virtio_net probed every NIC at insmod: the others exist now too.
  n=1
  while [ -e /sys/class/net/eth$n ]; do EXTRA_NICS="$EXTRA_NICS eth$n"; n=$((n + 1)); done
  if [ -n "$EXTRA_NICS" ]; then
    # Several NICs (maybe on one subnet): each answers ARP for its own
    # address only, and asks with it.
    echo 1 >/proc/sys/net/ipv4/conf/all/arp_ignore
    echo 2 >/proc/sys/net/ipv4/conf/all/arp_announce
  fi
  ifconfig eth0 up
  udhcpc -f -i eth0 -s /etc/udhcpc.script -x hostname:"$HN" -T 2 -t 5 -A 3 >/run/udhcpc.log 2>&1 &
  # The others ask at the same time, without the hostname (dnsmasq gives
  # a name to one lease only).
  for nic in $EXTRA_NICS; do
    ifconfig "$nic" up
    udhcpc -f -i "$nic" -s /etc/udhcpc.script -T 2 -t 5 -A 3 >"/run/udhcpc-$nic.log" 2>&1 &
  done
  if wait_for 240 test -s /run/guest-ip; then IP=$(cat /run/guest-ip); else warn "no DHCP lease after 60s"; cat /run/udhcpc.log; fi
else
  warn "no eth0"
fi
echo "GUEST-IP: $IP"
for nic in $EXTRA_NICS; do
  if wait_for 240 test -s "/run/guest-ip-$nic"; then
    echo "GUEST-IP-$nic: $(cat "/run/guest-ip-$nic")"
  else
    warn "no DHCP lease on $nic after 60s"; cat "/run/udhcpc-$nic.log"
    echo "GUEST-IP-$nic: none"
  fi
done
echo "GUEST-UPTIME: $(up)s (network up)"

# ---- http ----
echo "$HN" >/www/index.html
httpd -p 8080 -h /www || warn "httpd failed"

# ---- runcmd / user script ----
run_list runcmd RUNCMD
for doc in $SCRIPTS; do   # vendor script first, like cloud-init
  sc=$C/$doc-script
  interp=$(head -n1 $sc | sed 's/^#![[:space:]]*//; s/[[:space:]].*//')
  if [ -x "$interp" ]; then (cd / && $sc </dev/null); else (cd / && sh $sc </dev/null); fi
  echo "GUEST-$(echo $doc | tr a-z A-Z)SCRIPT exit=$?"
done
echo "GUEST-UPTIME: $(up)s"
echo "GUEST-READY"
while true; do sleep 3600; done
EOF
chmod 755 "$R/init"

# ---------------- bootable image ----------------
ISO=$WORK/iso
mkdir -p "$ISO/boot/grub"
cp "$VMLINUZ" "$ISO/boot/vmlinuz"
(cd "$R" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -9 >"$ISO/boot/initrd.gz"
cat >"$ISO/boot/grub/grub.cfg" <<'EOF'
set timeout=0
set default=0
menuentry "nomad-driver-virt test guest" {
  linux /boot/vmlinuz console=ttyS0 quiet
  initrd /boot/initrd.gz
}
EOF
grub-mkrescue -o "$WORK/guest.iso" "$ISO" >"$WORK/grub-mkrescue.log" 2>&1 \
  || { cat "$WORK/grub-mkrescue.log" >&2; die "grub-mkrescue failed"; }
qemu-img convert -O qcow2 "$WORK/guest.iso" "$WORK/guest.qcow2" || die "qemu-img convert failed"

cp "$WORK/guest.qcow2" "$IMG.tmp"
chmod 0644 "$IMG.tmp"
mv -f "$IMG.tmp" "$IMG"
echo "$KEY" >"$VERFILE.tmp" && mv -f "$VERFILE.tmp" "$VERFILE"
log "built $IMG ($(du -h "$IMG" | cut -f1), initrd $(du -h "$ISO/boot/initrd.gz" | cut -f1)) in $(( $(date +%s) - t0 ))s"
log "key: $KEY"
