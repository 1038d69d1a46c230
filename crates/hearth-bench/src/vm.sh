#!/usr/bin/env bash
# hearth-bench's "shell" variant: one VM started and stopped the way
# Firecracker's getting-started and network-setup guides do it — one tool
# invocation per step (ip, iptables, cp, curl), no daemon. hearth-bench
# writes this file into its temp dir and times `start` and `stop`.
#
#   vm.sh start DIR TAP HOST_IP GUEST_IP PORT UPLINK VMM KERNEL ROOTFS MAC ID
#   vm.sh stop  DIR TAP HOST_IP GUEST_IP PORT UPLINK
#
# `start` leaves the VMM running (its pid in DIR/vmm.pid) and returns once
# InstanceStart has answered; if any step fails it undoes everything and
# exits 1. `stop` undoes everything `start` did: Ctrl-Alt-Del and wait for
# the VMM to go, delete the tap and the four iptables rules, remove the
# VMM's socket and metrics file (the disk copy stays, as with hearth's stop).
#
# The rules are the guides': a MASQUERADE in nat/POSTROUTING, two FORWARD
# accepts, and a DNAT in nat/PREROUTING for the port forward. They are made
# per VM (matched on its address and tap) so that each VM's `stop` removes
# exactly its own. The getting-started guide also sleeps 15 ms before
# InstanceStart; that is left out here, so the shell figure is a lower bound.

set -uo pipefail

cmd=$1
DIR=$2 TAP=$3 HOST_IP=$4 GUEST_IP=$5 PORT=$6 UPLINK=$7
API_SOCKET="$DIR/api.sock"

put() {
  curl -fsS -X PUT --unix-socket "$API_SOCKET" \
    -H 'Content-Type: application/json' --data "$2" "http://localhost$1" >/dev/null
}

stop() {
  local rc=0 pid="" state=""
  [[ -f $DIR/vmm.pid ]] && pid=$(<"$DIR/vmm.pid")
  if [[ -n $pid ]]; then
    put /actions '{"action_type": "SendCtrlAltDel"}' || kill -KILL "$pid" 2>/dev/null
    # The VMM is not this script's child: wait until it is gone (a zombie
    # counts as gone; its parent reaps it).
    while read -r _ _ state _ 2>/dev/null <"/proc/$pid/stat" && [[ $state != Z ]]; do
      sleep 0.001
    done
  fi
  ip link del "$TAP" || rc=1
  iptables -t nat -D POSTROUTING -s "$GUEST_IP" -o "$UPLINK" -j MASQUERADE || rc=1
  iptables -D FORWARD -i "$UPLINK" -o "$TAP" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT || rc=1
  iptables -D FORWARD -i "$TAP" -o "$UPLINK" -j ACCEPT || rc=1
  iptables -t nat -D PREROUTING -p tcp --dport "$PORT" -j DNAT --to-destination "$GUEST_IP:80" || rc=1
  rm -f "$API_SOCKET" "$DIR/metrics.json" "$DIR/vmm.pid"
  return $rc
}

start() {
  local VMM=$8 KERNEL=$9 ROOTFS=${10} MAC=${11} ID=${12} tries=0
  set -eE
  trap 'stop >/dev/null 2>&1; exit 1' ERR
  mkdir -p "$DIR"

  # Network setup guide: a tap with the host's address, forwarding, NAT.
  ip tuntap add dev "$TAP" mode tap
  ip addr add "$HOST_IP/30" dev "$TAP"
  ip link set dev "$TAP" up
  echo 1 >/proc/sys/net/ipv4/ip_forward
  iptables -t nat -A POSTROUTING -s "$GUEST_IP" -o "$UPLINK" -j MASQUERADE
  iptables -A FORWARD -i "$UPLINK" -o "$TAP" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  iptables -A FORWARD -i "$TAP" -o "$UPLINK" -j ACCEPT
  iptables -t nat -A PREROUTING -p tcp --dport "$PORT" -j DNAT --to-destination "$GUEST_IP:80"

  # The VM's own copy of the rootfs.
  cp --sparse=always "$ROOTFS" "$DIR/rootfs.img"

  # Getting-started guide: start the VMM, then configure it over its API
  # socket with one curl per PUT.
  touch "$DIR/vmm.log" "$DIR/metrics.json"
  rm -f "$API_SOCKET"
  "$VMM" --api-sock "$API_SOCKET" --id "$ID" </dev/null >"$DIR/console.log" 2>&1 &
  echo $! >"$DIR/vmm.pid"
  while [[ ! -S $API_SOCKET ]]; do
    kill -0 $! 2>/dev/null
    ((++tries < 2000))
    sleep 0.001
  done
  put /logger "{\"log_path\": \"$DIR/vmm.log\", \"level\": \"Info\", \"show_level\": true, \"show_log_origin\": false}"
  put /metrics "{\"metrics_path\": \"$DIR/metrics.json\"}"
  put /machine-config '{"vcpu_count": 1, "mem_size_mib": 128, "smt": false}'
  put /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"boot_args\": \"console=ttyS0 reboot=k panic=1 pci=off ip=$GUEST_IP::$HOST_IP:255.255.255.252::eth0:off:1.1.1.1\"}"
  put /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$DIR/rootfs.img\", \"is_root_device\": true, \"is_read_only\": false}"
  put /network-interfaces/eth0 "{\"iface_id\": \"eth0\", \"guest_mac\": \"$MAC\", \"host_dev_name\": \"$TAP\"}"
  put /actions '{"action_type": "InstanceStart"}'
  trap - ERR
}

case $cmd in
  start) start "$@" ;;
  stop) stop ;;
  *) echo "usage: vm.sh start|stop DIR TAP HOST_IP GUEST_IP PORT UPLINK [VMM KERNEL ROOTFS MAC ID]" >&2; exit 2 ;;
esac
