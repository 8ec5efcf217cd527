#!/bin/sh
# Runs inside the freshly installed Debian root filesystem of the mm-node
# image (chroot from scripts/build-image.sh, RUN in docker/Dockerfile), so
# both builds end up with the same image. Trims what a test node never uses.
set -eu
# The cluster the postgresql package created: the entrypoint makes its own.
rm -rf /var/lib/postgresql/15/main /etc/postgresql/15/main
# LLVM JIT (about 150 MB with libLLVM and z3): without llvmjit.so PostgreSQL
# simply runs without JIT (and the entrypoint sets jit = off). dpkg still
# lists the packages; this image is for test clusters.
rm -f /usr/lib/postgresql/15/lib/llvmjit*.so /usr/lib/x86_64-linux-gnu/libLLVM-*.so* \
    /usr/lib/x86_64-linux-gnu/libz3.so*
rm -rf /usr/lib/postgresql/15/lib/bitcode
# Caches, lists, documentation, translations, locale sources.
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/* \
    /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* \
    /usr/share/i18n/* /tmp/* /debootstrap
# No daemon starts while packages are configured, now or later.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
mkdir -p /var/lib/mm /etc/mm /var/run/postgresql
chown postgres:postgres /var/lib/mm /var/run/postgresql
