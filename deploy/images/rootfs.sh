#!/bin/sh
# rootfs.sh DIR DEB...: unpacks Debian packages into DIR and makes it a runtime root: the CA
# bundle (what update-ca-certificates would write), a non-root user tidal (65532), /tmp.
# Used by the Containerfile and by build.sh, so both bases are the same.
set -eu
root=$1; shift
mkdir -p "$root"
for deb in "$@"; do dpkg-deb -x "$deb" "$root"; done
# Documentation, manuals, locales, iconv modules and libc's tools are not needed at run time
# (the binaries are Rust: no iconv, no shell).
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/lintian" \
  "$root/usr/share/locale" "$root/usr/lib/x86_64-linux-gnu/gconv" "$root/usr/lib/x86_64-linux-gnu/audit" \
  "$root/usr/sbin" "$root/usr/bin" "$root/sbin" "$root/bin"
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/tidal"
find "$root/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort | xargs cat \
  >"$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\ntidal:x:65532:65532:tidal:/home/tidal:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\ntidal:x:65532:\nnobody:x:65534:\n' >"$root/etc/group"
chown 65532:65532 "$root/home/tidal"
