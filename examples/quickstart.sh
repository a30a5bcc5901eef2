#!/usr/bin/env bash
# The quickstart, on a fresh Debian 12 machine, as root, from a clone of this
# repository:
#
#   bash examples/quickstart.sh
#
# Sets up the host (libvirt, QEMU, dnsmasq, libvirtd and its default network),
# builds the tiny demo guest and the plugin, then runs examples/jobs/hello.nomad.hcl
# on local libvirt through the plugin interface Nomad uses. The VM serves a page
# on port 8080 of this host; Ctrl-C stops the VM and removes it.
#
# It uses software emulation (TCG) so it works without /dev/kvm; see
# examples/quickstart-client.hcl.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "quickstart.sh: run as root (it installs packages and starts libvirtd)" >&2; exit 1; }

bash tests/setup/host.sh
bash tests/setup/guest.sh

# rustup installs into root's home; a bare PATH may not have it.
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  cat >&2 <<'MSG'
quickstart.sh: cargo is not installed. Install Rust 1.89 or newer with rustup:

  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
  . "$HOME/.cargo/env"

then run examples/quickstart.sh again.
MSG
  exit 1
fi

cargo build --release

# The address the job's port is offered on: the default route's source address,
# as `nomad-driver-virt run` picks it.
host_ip=$(ip -4 route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }')
if [ -z "$host_ip" ]; then
  dev=$(ip -4 route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
  [ -n "$dev" ] && host_ip=$(ip -4 -o addr show dev "$dev" | awk '{ split($4, a, "/"); print a[1]; exit }')
fi
host_ip=${host_ip:-127.0.0.1}

echo
echo "quickstart.sh: booting the hello VM (software emulation: give it a minute)."
echo "When the VM is up, run: curl http://$host_ip:8080/"
echo "Ctrl-C stops the VM and removes it."
echo
exec target/release/nomad-driver-virt run examples/jobs/hello.nomad.hcl \
  --plugin-config examples/quickstart-client.hcl
