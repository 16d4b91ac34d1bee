#!/usr/bin/env bash
# Source on a lent GPU machine after tools/device/setup.sh: points inductor at /tmp/inductor and unpacks a carried
# cache ($INDUCTOR_IN/inductor.tgz.*, INDUCTOR_IN=.inductor by default: the parts a call sent back) into it, so compiled graphs load in seconds
# instead of compiling (~30 s a row cold). `send_inductor_cache MAX_MIB` packs it into $OUT/inductor.tgz.*
# (15 MiB parts) when it compresses to at most MAX_MIB (8 files come back; what is carried stays under 64 MiB).
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
if ls "${INDUCTOR_IN:-.inductor}"/inductor.tgz.* >/dev/null 2>&1; then
  cat "${INDUCTOR_IN:-.inductor}"/inductor.tgz.* | tar xzf - -C /tmp && echo "inductor cache: $(du -sh /tmp/inductor | cut -f1) unpacked"
fi
send_inductor_cache() {
  tar czf /tmp/inductor.tgz -C /tmp inductor
  if [ "$(stat -c %s /tmp/inductor.tgz)" -le $(($1 * 2**20)) ]; then split -b 15m /tmp/inductor.tgz "$OUT/inductor.tgz."; fi
  echo "inductor cache: $(( $(stat -c %s /tmp/inductor.tgz) / 2**20 )) MiB compressed; $(ls "$OUT"/inductor.tgz.* 2>/dev/null | wc -l) parts sent back"
}
