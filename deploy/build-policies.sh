#!/usr/bin/env bash
# Builds the policy modules the weir-policies ConfigMap ships and gzips them into
# deploy/base/policies/ as NAME.wasm.gz, where base/kustomization.yaml picks them up:
#
#   deploy/build-policies.sh              # the modules base/kustomization.yaml lists
#   deploy/build-policies.sh random ...   # others (add them to base/kustomization.yaml too)
#
# Needs Rust and its wasm32-wasip2 target (`rustup target add wasm32-wasip2`). kube-default
# is built into weir and never shipped.
set -euo pipefail

# What base/kustomization.yaml puts into weir-policies (host/tests/deploy.rs checks the two
# agree): the whole library, gzipped (NAME.wasm.gz; weir inflates them), which fits in the
# 1 MiB a ConfigMap holds. For more, ship several ConfigMaps and select them with
# policies.selector in weir.toml.
SHIPPED=(random round-robin least-connections p2c-ewma maglev ring-hash locality client-ip-affinity)

LIMIT=1048576
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/deploy/base/policies"
target_dir="$root/target/guests"
artifacts="$target_dir/wasm32-wasip2/policy"

if [ $# -gt 0 ]; then
    policies=("$@")
else
    policies=("${SHIPPED[@]}")
fi

sysroot="$(rustc --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/wasm32-wasip2/lib" ]; then
    echo "the wasm32-wasip2 target is missing: rustup target add wasm32-wasip2" >&2
    exit 1
fi

packages=()
for policy in "${policies[@]}"; do
    if [ "$policy" = kube-default ] || [ "$policy" = sdk ]; then
        echo "$policy is not shipped: kube-default is built into weir, sdk is a library" >&2
        exit 1
    fi
    if [ ! -f "$root/policies/$policy/Cargo.toml" ]; then
        echo "no policy crate policies/$policy: the library is listed in policies/README.md" >&2
        exit 1
    fi
    packages+=(-p "$policy")
done

# The build host/build.rs runs (profile `policy`, target dir target/guests): the two share
# their artifacts, so after a `cargo build` of weir this only copies.
cd "$root"
cargo build --target wasm32-wasip2 --profile policy --target-dir "$target_dir" "${packages[@]}"

total=$(stat -c %s "$out/policies.toml")
for policy in "${policies[@]}"; do
    gzip -9 -n -c "$artifacts/${policy//-/_}.wasm" >"$out/$policy.wasm.gz"
    size=$(stat -c %s "$out/$policy.wasm.gz")
    total=$((total + size))
    printf '%8d  deploy/base/policies/%s.wasm.gz (%d inflated)\n' "$size" "$policy" \
        "$(stat -c %s "$artifacts/${policy//-/_}.wasm")"
done
printf '%8d  in all, with policies.toml (a ConfigMap holds at most %d)\n' "$total" "$LIMIT"
if [ "$total" -gt "$LIMIT" ]; then
    echo "too large for one ConfigMap: ship fewer modules in it" >&2
    exit 1
fi
