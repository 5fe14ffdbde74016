#!/usr/bin/env bash
# `make test-arm`: the runtime tests on arm64, emulated, in a Debian root holding only what a
# gateway has (Python 3 and `pip install .[runtime]`; no torch, no onnx).
#
#   bash .ci/arm-test.sh FIXTURES_DIR      # FIXTURES_DIR: written by tests/runtime_fixtures.py build
#
# 1. binfmt: arm64 ELF files run through qemu-user (qemu-user-static). binfmt_misc is mounted and
#    qemu-aarch64 registered if they are not: an explicit `qemu-aarch64-static python3` is not
#    enough, because the tests start subprocesses (`sys.executable`), which the kernel must run.
# 2. The root: Debian bookworm arm64 from mmdebstrap (Essential: yes packages plus python3,
#    python3-venv, ca-certificates, libstdc++6; no apt: nothing is installed with apt later),
#    cached as $EDGEGLM_CACHE/arm64-root-bookworm-vN.tar.zst (default ~/.cache/edgeglm); bump
#    ROOT_VERSION below to rebuild it everywhere. Extracted into a temporary folder each run.
# 3. Inside it (chroot, clean environment): this checkout (tracked and new files), the fixtures,
#    the host's own CA certificates (/usr/local/share/ca-certificates, for pip), a venv with
#    `pip install -e .[runtime] pytest hypothesis` from PyPI, then `pytest tests/runtime` and the
#    golden comparison against the outputs recorded at build time on the x86-64 host.
#
# Only /proc and /dev are mounted in the root, never /sys: with /sys there, `import onnxruntime`
# segfaults under qemu (its CPU detection reads the host's x86 topology). Everything runs in a
# private mount namespace, so no mount outlives this script even if it is killed.
# Timings under emulation mean nothing; only correctness counts here. pytest runs with
# EDGEGLM_EMULATED=qemu-aarch64, which skips the tests marked `timing` (tests/conftest.py). The
# install health check keeps the bundle's latency budget: the tiny test model meets it even emulated
# (≈0.4 ms against 20 ms). No MQTT broker in the root: the tests that need Mosquitto skip here
# (they run in `make test-runtime`); adding `mosquitto` to PACKAGES runs them too, for ≈3 more
# minutes of emulated tests.
# Needs: root, mmdebstrap, arch-test, qemu-user-static, binfmt-support, zstd (.ci/run installs them).
set -euo pipefail

ROOT_VERSION=2
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,libstdc++6  # onnxruntime needs libstdc++
MIRRORS=(
  "deb http://deb.debian.org/debian $SUITE main"
  "deb http://deb.debian.org/debian $SUITE-updates main"
  "deb http://deb.debian.org/debian-security $SUITE-security main"
)

die() { echo "test-arm: $*" >&2; exit 1; }
now() { date +%s; }

fixtures=${1:?usage: .ci/arm-test.sh FIXTURES_DIR (written by tests/runtime_fixtures.py build)}
fixtures=$(cd "$fixtures" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${EDGEGLM_CACHE:-$HOME/.cache/edgeglm}
tarball=$cache/arm64-root-$SUITE-v$ROOT_VERSION.tar.zst

[ "$(id -u)" -eq 0 ] || die "needs root (chroot, mounts, mmdebstrap): run it as root, as CI does"
[ -f "$fixtures/fixtures.json" ] || die "$fixtures has no fixtures.json: run 'make test-arm', which builds them first"
for tool in mmdebstrap zstd chroot unshare; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install mmdebstrap arch-test qemu-user-static binfmt-support zstd"
done

# --- 1. binfmt (in the host's namespace: the registration must outlive this script) -------------
if [ -z "${EDGEGLM_ARM_NS:-}" ]; then
  binfmt=/proc/sys/fs/binfmt_misc
  if [ ! -e "$binfmt/status" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt" || die "cannot mount binfmt_misc on $binfmt; arm64 binaries cannot run here"
  fi
  if [ ! -e "$binfmt/qemu-aarch64" ]; then
    command -v update-binfmts >/dev/null || die "update-binfmts is missing: apt-get install binfmt-support qemu-user-static"
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
  fi
  [ "$(head -n1 "$binfmt/qemu-aarch64")" = enabled ] || die "binfmt entry qemu-aarch64 is disabled: update-binfmts --enable qemu-aarch64"
  echo "test-arm: binfmt qemu-aarch64 $(grep -o 'flags: .*' "$binfmt/qemu-aarch64"), interpreter $(sed -n 's/^interpreter //p' "$binfmt/qemu-aarch64")"
  # A private mount namespace: every mount below disappears with this process, however it ends.
  EDGEGLM_ARM_NS=1 exec unshare --mount --propagation private bash "$0" "$@"
fi

t_start=$(now)

# --- 2. the root: restored from the cache, else built and cached ------------------------------
mkdir -p "$cache"
if [ -f "$tarball" ]; then
  root_how="restored from $tarball"
else
  echo "test-arm: building the $SUITE arm64 root with mmdebstrap (a few minutes; cached afterwards)"
  part=${tarball%.tar.zst}.part.tar.zst
  rm -f "$part"
  mmdebstrap --quiet --arch=arm64 --variant=essential --include="$PACKAGES" "$SUITE" "$part" "${MIRRORS[@]}"
  mv "$part" "$tarball"
  root_how="built with mmdebstrap and cached in $tarball"
fi
t_built=$(now)
echo "test-arm: root ready in $((t_built - t_start)) s ($root_how)"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/edgeglm-arm64.XXXXXX")
root=$work/root
cleanup() {
  # Deepest mount first; in this private namespace nothing of this is visible to the host anyway.
  findmnt -rn -o TARGET | grep "^$root/" | sort -r | while read -r m; do umount -l "$m" || true; done
  if findmnt -rn -o TARGET | grep -q "^$root/"; then
    echo "test-arm: mounts left under $root; not deleting $work" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT
mkdir "$root"
tar --zstd -xpf "$tarball" -C "$root" --numeric-owner

interp=$(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)
if ! grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  # Without the F (fix binary) flag the kernel opens the interpreter inside the chroot.
  install -D -m 0755 "$(readlink -f "$interp")" "$root$interp"
fi

mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mkdir -p "$cache/arm64-pip" "$root/root/.cache/pip"
mount --bind "$cache/arm64-pip" "$root/root/.cache/pip"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The host's locally added CAs (a TLS-inspecting proxy's, say), for pip: appended to the bundle
# Debian's pip and OpenSSL read. (update-ca-certificates would do the same but takes a minute emulated.)
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  for crt in /usr/local/share/ca-certificates/*.crt; do cat "$crt"; echo; done >>"$root/etc/ssl/certs/ca-certificates.crt"
fi

mkdir -p "$root/src/edgeglm"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$root/src/edgeglm"
cp -a "$fixtures" "$root/src/fixtures"

# A clean environment: nothing of the host's (pip config, proxies, PYTHONPATH) leaks in.
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 "$@"
}
machine=$(in_root /usr/bin/uname -m)
[ "$machine" = aarch64 ] || die "the root runs as $machine, not aarch64: binfmt emulation is not in effect"
python_version=$(in_root /usr/bin/python3 -c 'import platform; print(platform.python_version())')
t_ready=$(now)

# --- 3. install and test -------------------------------------------------------------------------
echo "test-arm: pip install -e '.[runtime]' pytest hypothesis (Python $python_version, aarch64, emulated)"
in_root /bin/sh -c 'cd /src/edgeglm && python3 -m venv /opt/venv &&
  /opt/venv/bin/python -m pip install --quiet -c constraints.txt -e ".[runtime]" "pytest>=8" "hypothesis>=6"'
if in_root /opt/venv/bin/python -c 'import torch' 2>/dev/null; then
  die "torch is importable in the arm64 runtime venv; the runtime extra must not pull it"
fi
ort_version=$(in_root /opt/venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)')
t_pip=$(now)
echo "test-arm: venv and pip install took $((t_pip - t_ready)) s"

echo "test-arm: pytest tests/runtime (onnxruntime $ort_version)"
set +e
in_root /bin/sh -c 'cd /src/edgeglm && EDGEGLM_TEST_FIXTURES=/src/fixtures EDGEGLM_EMULATED=qemu-aarch64 /opt/venv/bin/python -m pytest -q -p no:cacheprovider tests/runtime'
rc_tests=$?
t_tests=$(now)
in_root /bin/sh -c 'cd /src/edgeglm && /opt/venv/bin/python tests/runtime_fixtures.py compare /src/fixtures'
rc_golden=$?
set -e
t_end=$(now)

[ $rc_tests -eq 5 ] && echo "test-arm: pytest collected no tests" >&2
cat <<EOF
test-arm summary (Debian $SUITE arm64 under qemu-user; Python $python_version, onnxruntime $ort_version):
  root        $((t_built - t_start)) s  ($root_how)
  prepare     $((t_ready - t_built)) s  (extract the root, copy checkout + fixtures + CA certificates)
  pip         $((t_pip - t_ready)) s
  tests       $((t_tests - t_pip)) s  (pytest exit $rc_tests)
  golden      $((t_end - t_tests)) s  (compare exit $rc_golden)
  total       $((t_end - t_start)) s
EOF
[ $rc_tests -eq 0 ] && [ $rc_golden -eq 0 ]
