# Sourced by scripts/test before the network-namespace tests (tests/test_mdns.py, tests/test_relay_nat.py,
# tests/test_upnp.py):
# installs what they need when it is missing. Needs root; quiet when everything is there.
_netns_need=""
command -v ip >/dev/null 2>&1 || _netns_need="$_netns_need iproute2"
command -v nft >/dev/null 2>&1 || _netns_need="$_netns_need nftables"      # the NAT routers of test_relay_nat.py
command -v tcpdump >/dev/null 2>&1 || _netns_need="$_netns_need tcpdump"
# The UPnP router of tests/test_upnp.py. Debian's "miniupnpd" package is only the service around the daemon
# (init script, debconf, started at install); "miniupnpd-nftables" is the daemon alone (/usr/sbin/miniupnpd,
# nftables backend), which the test starts itself in a namespace: nothing is started or left running here.
[ -x /usr/sbin/miniupnpd ] || command -v miniupnpd >/dev/null 2>&1 || _netns_need="$_netns_need miniupnpd-nftables"
if [ -n "$_netns_need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing for the namespace tests:$_netns_need" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $_netns_need >/dev/null 2>&1 \
        || echo "could not install$_netns_need: the namespace tests will say what is missing" >&2
fi
unset _netns_need
