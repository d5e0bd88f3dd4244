# Background jobs that outlive a GPU call (setsid), collected across calls while the machine stays warm:
#   bash scripts/gpu/bg.sh start NAME CMD...   start CMD once as job NAME (again: nothing), its $OUT /tmp/bg/NAME
#   WAIT=540 bash scripts/gpu/bg.sh wait NAME... wait up to WAIT s for the jobs, then pack what each has written
#                                                so far (and its log, and rc once done) as $OUT/NAME.tgz
# One archive a job: the device returns at most 8 files, none more than 2 folders below $OUT (a job's runs/SHAPE/
# VARIANT/summary.json came back as nothing on 2026-12-04). Here: mkdir -p X && tar xzf FILES_AT/NAME.tgz -C X
set -euo pipefail
what=$1; shift
case "$what" in
  start) name=$1; shift
         [ -d /tmp/bg/$name ] && { echo "$name: already started"; exit 0; }
         mkdir -p /tmp/bg/$name
         OUT=/tmp/bg/$name setsid nohup bash -c '"$@"; echo $? > $OUT/rc' _ "$@" > /tmp/bg/$name.log 2>&1 < /dev/null &
         echo "$name: started" ;;
  wait)  end=$((SECONDS + ${WAIT:-540}))
         while [ $SECONDS -lt $end ]; do
           left=0; for n in "$@"; do [ -f /tmp/bg/$n/rc ] || left=1; done
           [ $left = 0 ] && break; sleep 5
         done
         for n in "$@"; do
           cp /tmp/bg/$n.log /tmp/bg/$n/log 2>/dev/null || true
           mkdir -p ${OUT:-/tmp/out}; tar czf ${OUT:-/tmp/out}/$n.tgz -C /tmp/bg/$n . || true
           echo "$n: rc $(cat /tmp/bg/$n/rc 2>/dev/null || echo running)"; tail -8 /tmp/bg/$n.log
         done ;;
  *) echo "usage: bash scripts/gpu/bg.sh start NAME CMD... | wait NAME..."; exit 2 ;;
esac
