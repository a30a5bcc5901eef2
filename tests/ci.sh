#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root, on a fresh Debian 12 machine):
# installs and starts what the tests need, then checks formatting and lints
# and runs every test. Missing prerequisites fail loudly; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "tests/ci.sh: run as root (it installs packages and starts libvirtd)" >&2; exit 1; }

bash tests/setup/host.sh
# The tiny guest the end-to-end tests boot (cached between runs).
bash tests/setup/guest.sh
# Single-node Ceph cluster for the RBD pool tests (tests/e2e_ceph.rs):
# idempotent, ~25-35 s cold once the packages are installed, ~6 s when up.
bash tests/setup/ceph.sh

# rustup's toolchain may live in root's home when CI runs with a bare PATH.
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi

export NOMAD_DRIVER_VIRT_HOST_TESTS=1 # host tests fail, never skip, when a prerequisite is missing
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Names the tests give what they create, found anywhere on the host.
test_things() {
  {
    virsh -q -c qemu:///system list --all --name | sed '/^$/d; s/^/domain /'
    virsh -q -c qemu:///system pool-list --all --name | sed '/^$/d; s/^/storage pool /'
    virsh -q -c qemu:///system net-list --all --name | sed '/^$/d; s/^/network /'
    virsh -q -c qemu:///system net-dumpxml default | grep -o '<host [^>]*>'
    virsh -q -c qemu:///system net-dumpxml default | grep -o '<txt name=.nomad-driver-virt-respawn[^>]*>' | sed 's/^/TXT record on network default /'
    ip netns list | awk '{ print $1 }'
    ip -o link show | awk -F': ' '{ print $2 }'
    iptables-save | grep -v '^#' | sed -E 's/ \[[0-9]+:[0-9]+\]$//'
    ls /var/lib/nomad-driver-virt/journal | sed 's/^/start journal record /'
    # RBD images in the test pool (client.ndvtest may only see that pool;
    # any image there is a test's) and libvirt secrets of the tests' pools.
    timeout 60 rbd --id ndvtest --keyfile /etc/ceph/ceph.client.ndvtest.key -m 127.0.0.1:6789 ls ndvtest-rbd | sed 's/^/rbd image ndvtest-rbd\//'
    virsh -q -c qemu:///system secret-list | awk '{ print "libvirt secret " $2 " " $3 " " $1 }'
  } 2>/dev/null | grep -iE 'ndvtest|^domain |^storage pool ndvtest|^start journal record |^TXT record |^rbd image ' | sort -u || true
}
dhcp_hosts() { virsh -q -c qemu:///system net-dumpxml default | grep -c "<host " || true; }
hosts_before=$(dhcp_hosts)
things_before=$(test_things)
cargo test --all-targets 2>&1 | tee /tmp/nomad-driver-virt-test.log
# The benchmark programs in their short modes (built above, debug): they must
# run and clean up, their figures are not checked. About two to three minutes
# (three guest boots).
for bench in bench_handshake bench_control_plane bench_density bench_start bench_disks; do
  echo "tests/ci.sh: cargo run --example $bench -- --short"
  cargo run -q --example "$bench" -- --short
done
hosts_after=$(dhcp_hosts)
if [ "$hosts_before" != "$hosts_after" ]; then
  echo "tests/ci.sh: DHCP host reservations on network default went from $hosts_before to $hosts_after" >&2
  exit 1
fi

# The exec benchmark through the plugin's real gRPC (go-plugin transport,
# ExecTask/ExecTaskStreaming into the test guest), in its short mode: it must
# keep working. Its table is informational; the leftover check below covers it.
cargo run --quiet --example bench_exec_rpc -- --short

# The README's first command, end to end: boot the hello VM, fetch its page
# through the mapped port, then Ctrl-C it and expect a clean exit.
quickstart_log=/tmp/nomad-driver-virt-quickstart.log
bash examples/quickstart.sh > "$quickstart_log" 2>&1 &
quickstart_pid=$!
url=""
page=""
for _ in $(seq 1 900); do
  if [ -z "$url" ]; then
    url=$(grep -o 'curl http://[^ ]*' "$quickstart_log" | head -n 1 | cut -d' ' -f2 || true)
  fi
  if [ -n "$url" ] && page=$(curl -sf --max-time 3 "$url") && [ -n "$page" ]; then
    break
  fi
  if ! kill -0 "$quickstart_pid" 2>/dev/null; then
    break
  fi
  sleep 1
done
kill -INT "$quickstart_pid" 2>/dev/null || true
quickstart_rc=0
wait "$quickstart_pid" || quickstart_rc=$?
if [ -z "$page" ] || [ "$quickstart_rc" -ne 0 ]; then
  echo "tests/ci.sh: quickstart failed (page: ${page:-none}, exit $quickstart_rc); its output:" >&2
  tail -n 60 "$quickstart_log" >&2
  exit 1
fi
echo "tests/ci.sh: quickstart served: $page"

# Nothing the tests created may remain on the host.
leftovers=$(comm -13 <(echo "$things_before") <(test_things))
if [ -n "$things_before" ]; then
  echo "tests/ci.sh: already on the host before the tests (not counted): $(echo "$things_before" | tr '\n' ' ')" >&2
fi
if [ -n "$leftovers" ]; then
  echo "tests/ci.sh: the test suite left these behind:" >&2
  echo "$leftovers" >&2
  exit 1
fi
echo "tests/ci.sh: no test leftovers on the host"

# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' \
  /tmp/nomad-driver-virt-test.log
