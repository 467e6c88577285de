# netns_lib.sh - hosts in network namespaces joined by one bridge, for the tests that cross a
# network on one machine (test_multihost_netns.sh, tests/soak/run_soak.sh). Sourced, not run.

# The switch: namespace sw (made by the caller) with a bridge br0 that forwards at once.
netns_bridge() { # sw
  ip -n "$1" link add br0 type bridge forward_delay 0 && ip -n "$1" link set br0 up
}

# A host: namespace ns with eth0 at cidr, the other end of its veth pair (${ns}p) a port of sw's
# bridge; cutting that port (ip -n sw link set ${ns}p down) cuts the host's link.
netns_host() { # sw ns cidr
  local sw="$1" ns="$2" cidr="$3"
  ip netns add "$ns" &&
    ip link add "${ns}h" type veth peer name "${ns}p" &&
    ip link set "${ns}h" netns "$ns" && ip link set "${ns}p" netns "$sw" &&
    ip -n "$ns" link set "${ns}h" name eth0 &&
    ip -n "$ns" addr add "$cidr" dev eth0 &&
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up &&
    ip -n "$sw" link set "${ns}p" master br0 && ip -n "$sw" link set "${ns}p" up
}
