#!/usr/bin/env bash
# Makes the GNU tar seeds of the tar_table fuzz target (fuzz/corpus/tar_table/seed-{gnu,pax}-*):
# the header forms a layer can hold that the other seeds lack. Run as root (for the device
# nodes), with GNU tar and setfattr; rewrites the seeds in place.
#
#   seed-gnu-long-names.tar    --format=gnu: a name and a hardlink target over 100 bytes
#                              (GNU `L` and `K` records), a long symlink target
#   seed-gnu-relinked.tar      --format=gnu, two passes (--append): hardlinks whose target is
#                              replaced later by a file, a directory and a symlink; a path
#                              archived twice (a hardlink to itself)
#   seed-gnu-base256.tar       --format=gnu: uid/gid past 2097151 and a time before 1970, which
#                              GNU tar writes in base-256; and one size field rewritten from
#                              octal to base-256 (GNU tar writes that only past 8 GiB), checked
#                              by GNU tar reading it back
#   seed-pax-sparse-1.0.tar    --format=pax --sparse --sparse-version=1.0 (map in the data)
#   seed-pax-sparse-0.1.tar    --format=pax --sparse --sparse-version=0.1 (GNU.sparse.map)
#   seed-pax-nodes-xattrs.tar  --format=pax --xattrs: char and block devices, a fifo, user.*
#                              xattrs, sub-second times, setuid/setgid/sticky modes
#
# The index_decode seeds with lying file tables (seed-lying-*.idx) come from
#   cargo test -p lazylayer-index --lib -- --ignored lying_table_seeds
#
# Each seed must stay small (under 20 KiB): libFuzzer mutates them byte by byte.
set -euo pipefail

out="$(cd "$(dirname "$0")" && pwd)/corpus/tar_table"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# Deterministic archives: fixed times and owners, sorted names, no atime/ctime in PAX headers,
# 512-byte records (no padding to 10 KiB).
common=(--sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner --blocking-factor=1)
pax=(--format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)

cd "$work"

# Long names and links.
mkdir long && (
    cd long
    dir=directory-with-a-name-long-enough-that-together/with-its-file-the-path-passes-100-bytes
    mkdir -p "$dir"
    printf 'a file behind a long name\n' > "$dir/file-at-the-end-of-a-long-path.txt"
    ln "$dir/file-at-the-end-of-a-long-path.txt" short-hardlink
    ln "$dir/file-at-the-end-of-a-long-path.txt" "$dir/and-a-second-long-name-that-is-a-hardlink.txt"
    ln -s "$dir/file-at-the-end-of-a-long-path.txt" long-symlink
)
tar "${common[@]}" --format=gnu -cf "$out/seed-gnu-long-names.tar" -C long .

# Hardlinks that outlive their targets (the same layer as the index tests' relinked layer).
mkdir relinked && (
    cd relinked
    printf 'old a\n' > a && ln a b && ln a c
    printf 'old l1\n' > l1 && ln l1 l2
    printf 'old m1\n' > m1 && ln m1 m2
    tar --mtime=@1700000000 --owner=0 --group=0 --blocking-factor=1 --format=gnu \
        -cf "$out/seed-gnu-relinked.tar" a b c a l1 l2 m1 m2
    rm a l1 m1
    printf 'new a\n' > a
    mkdir l1 && printf 'in l1\n' > l1/x
    ln -s a m1
    tar --mtime=@1700000100 --owner=0 --group=0 --blocking-factor=1 --format=gnu \
        -rf "$out/seed-gnu-relinked.tar" a l1 m1
)

# Base-256 numbers.
mkdir base256 && printf 'size in base-256\n' > base256/size-in-base-256 \
    && printf 'big ids, old time\n' > base256/big-ids-old-time
tar --mtime=@1700000000 --owner=0 --group=0 --blocking-factor=1 --format=gnu \
    -cf base256.tar -C base256 size-in-base-256
tar --mtime=@-86400 --owner=root:3000000 --group=root:4000000 --numeric-owner \
    --blocking-factor=1 --format=gnu -rf base256.tar -C base256 big-ids-old-time
# The first header's size (offset 124, 12 bytes) as base-256: 0x80, then the value big-endian;
# then the checksum (offset 148) again, over the header with the checksum field as spaces.
size=$(stat -c %s base256/size-in-base-256)
printf "\\x80\\0\\0\\0\\0\\0\\0\\0\\x$(printf %02x $((size >> 24 & 255)))\\x$(printf %02x $((size >> 16 & 255)))\\x$(printf %02x $((size >> 8 & 255)))\\x$(printf %02x $((size & 255)))" |
    dd of=base256.tar bs=1 seek=124 conv=notrunc status=none
printf '        ' | dd of=base256.tar bs=1 seek=148 conv=notrunc status=none
sum=$(od -An -tu1 -v -N512 base256.tar | tr -s ' ' '\n' | awk '{ s += $1 } END { print s }')
printf '%06o\0 ' "$sum" | dd of=base256.tar bs=1 seek=148 conv=notrunc status=none
tar -tvf base256.tar | grep -q ' 17 .*size-in-base-256$' || { echo "GNU tar does not read the base-256 size back" >&2; exit 1; }
mkdir base256-check && tar -xf base256.tar -C base256-check
cmp base256/size-in-base-256 base256-check/size-in-base-256
mv base256.tar "$out/seed-gnu-base256.tar"

# Sparse files, both PAX forms.
mkdir sparse
truncate -s 1M sparse/sparse.img
printf 'head' | dd of=sparse/sparse.img conv=notrunc status=none
printf 'middle' | dd of=sparse/sparse.img bs=1 seek=$((512 << 10)) conv=notrunc status=none
printf 'tail' | dd of=sparse/sparse.img bs=1 seek=$(((1 << 20) - 4)) conv=notrunc status=none
for version in 1.0 0.1; do
    tar "${common[@]}" "${pax[@]}" --sparse --sparse-version="$version" \
        -cf "$out/seed-pax-sparse-$version.tar" -C sparse sparse.img
    tar -tvf "$out/seed-pax-sparse-$version.tar" | grep -q ' 1048576 ' \
        || { echo "sparse $version: the real size is not in the archive" >&2; exit 1; }
done

# Devices, a fifo, xattrs, sub-second times, special modes.
mkdir nodes
mknod nodes/null c 1 3
mknod nodes/loop7 b 7 7
mkfifo nodes/fifo
printf 'xattrs\n' > nodes/with-xattrs
setfattr -n user.lazylayer.seed -v 'a value' nodes/with-xattrs
setfattr -n user.binary -v 0x00ff10 nodes/with-xattrs
mkdir -m 1777 nodes/sticky
printf '#!/bin/sh\n' > nodes/setuid && chmod 4755 nodes/setuid
printf '#!/bin/sh\n' > nodes/setgid && chmod 2755 nodes/setgid
touch -h -d @1700000000 nodes/* nodes
touch -d '2023-11-14 22:13:20.123456789 UTC' nodes/with-xattrs nodes/setuid
tar --sort=name --owner=0 --group=0 --numeric-owner --blocking-factor=1 "${pax[@]}" \
    --xattrs --xattrs-include='user.*' -cf "$out/seed-pax-nodes-xattrs.tar" -C nodes .

for seed in "$out"/seed-gnu-*.tar "$out"/seed-pax-*.tar; do
    bytes=$(stat -c %s "$seed")
    if ((bytes >= 20 << 10)); then
        echo "$seed is $bytes bytes: seeds must stay under 20 KiB" >&2
        exit 1
    fi
    echo "$(basename "$seed"): $bytes bytes"
done
