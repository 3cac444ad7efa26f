#!/usr/bin/env bash
# A real S3 store on loopback for the tests: Ceph's RADOS Gateway (Debian's
# radosgw) over one monitor and one in-memory OSD, no auth inside the cluster.
#   ceph-rgw.sh start DIR PORT   prints the endpoint once the gateway answers
#   ceph-rgw.sh stop DIR
# The S3 user is vmapipe-test / vmapipe-test-secret.
set -euo pipefail
cmd=${1:?start|stop}; DIR=${2:?dir}
if [ "$cmd" = stop ]; then
  pkill -9 -f -- "-c $DIR/ceph.conf" || true
  rm -rf "$DIR"
  exit 0
fi
PORT=${3:?port}
MONPORT=$((PORT + 1))
rm -rf "$DIR"; mkdir -p "$DIR"/{mon,osd,run,log,rgw}
fsid=$(cat /proc/sys/kernel/random/uuid)
cat > "$DIR/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MONPORT
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 17179869184
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
pid file = $DIR/run/\$name.pid
keyring = $DIR/keyring
ms bind ipv6 = false
ms bind msgr2 = false
[mon.a]
mon data = $DIR/mon
[osd.0]
osd data = $DIR/osd
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
CONF
c=(-c "$DIR/ceph.conf")
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v1:127.0.0.1:$MONPORT]" --fsid "$fsid" "$DIR/monmap" >/dev/null
ceph-mon "${c[@]}" --id a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/keyring"
ceph-mon "${c[@]}" --id a
timeout 60 ceph "${c[@]}" osd create >/dev/null
ceph-osd "${c[@]}" -i 0 --mkfs 2>/dev/null
timeout 60 ceph "${c[@]}" osd crush add osd.0 1 root=default host=localhost >/dev/null 2>&1
ceph-osd "${c[@]}" -i 0 2>/dev/null
radosgw "${c[@]}" -n client.rgw
timeout 60 radosgw-admin "${c[@]}" user create --uid vmapipe-test --display-name vmapipe-test \
  --access-key vmapipe-test --secret vmapipe-test-secret >/dev/null
for _ in $(seq 1 240); do
  code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/" || true)
  if [ "$code" != 000 ]; then echo "http://127.0.0.1:$PORT"; exit 0; fi
  sleep 0.25
done
echo "radosgw did not answer on port $PORT; logs in $DIR/log" >&2
exit 1
