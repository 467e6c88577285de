#!/usr/bin/env bash
# folioctl's cluster commands end to end on a tiny random model: `folioctl up --groups 2` in the
# background, `health` until it serves, `generate --json` (the DESIGN.md JSON contract), streamed
# `generate`, `--spec` through both paths, `status --json`, `drain g0` / `undrain g0` (seen in status; requests go to g1 while g0
# drains), then SIGTERM to `up`: it exits and no coordinator or worker of that cluster is left.
set -uo pipefail
build="${FOLIO_BUILD_DIR:?}"
tmp="$(mktemp -d)"
ctl="$build/folioctl"
export FOLIO_LOG=warn
ep="ipc:///tmp/folio-e2e-cli-$$.c"
wep="ipc:///tmp/folio-e2e-cli-$$.w"
up_pid=""
fails=0
check() { # name, command...
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}
# Processes of this cluster (their command lines carry its worker endpoint), by pid.
cluster_pids() { pgrep -f -- "$wep" 2>/dev/null | grep -vx "$$" || true; }
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then kill -TERM "$up_pid" 2>/dev/null; sleep 1; fi
  for p in $(cluster_pids); do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$tmp"; rm -f "/tmp/folio-e2e-cli-$$.c" "/tmp/folio-e2e-cli-$$.w"
}
trap cleanup EXIT
slow=1
[ -n "${FOLIO_E2E_SLOW:-}" ] && slow="$FOLIO_E2E_SLOW"

"$build/folio-mkmodel" -o "$tmp/tiny.gguf" --layers 2 --dim 64 --ff 128 --heads 4 --kv-heads 2 --vocab 400 \
  --ctx 512 --type q8_0 --seed 3 >/dev/null || { echo "FAIL folio-mkmodel"; exit 1; }

"$ctl" up --groups 2 -m "$tmp/tiny.gguf" --listen "$ep" --workers "$wep" --threads-per-worker 1 \
  --heartbeat-ms 200 --log-dir "$tmp/logs" --no-http >"$tmp/up.out" 2>"$tmp/up.err" &
up_pid=$!

# health: exit 0 once the cluster serves.
healthy=0
for _ in $(seq 1 $((100 * slow))); do
  if "$ctl" health --coordinator "$ep" >"$tmp/health.out" 2>&1; then healthy=1; break; fi
  kill -0 "$up_pid" 2>/dev/null || break
  sleep 0.2
done
check "folioctl up: the cluster becomes healthy (folioctl health exits 0)" test $healthy -eq 1
if [ $healthy -ne 1 ]; then
  echo "--- up stderr"; tail -n 30 "$tmp/up.err"; for f in "$tmp"/logs/*.log; do echo "--- $f"; tail -n 20 "$f"; done
  exit 1
fi
check "folioctl up: one coordinator and two workers are running" test "$(cluster_pids | wc -l)" -ge 3

# One meaning for a request: the same flags through the cluster (the worker's request layer) and in
# one process (folioctl run's) give the same tokens, at the sampling defaults with a seed, with
# penalties and a stop string, and greedily.
for flags in "--seed 7" "--seed 3 --repeat-penalty 1.3 --presence-penalty 0.5 --logit-bias 5=-100" \
             "--temperature 0 --stop e"; do
  g="$("$ctl" generate --coordinator "$ep" -p "hello cluster" -n 16 --ignore-eos $flags --json 2>/dev/null | tail -n 1)"
  r="$("$ctl" run -m "$tmp/tiny.gguf" -p "hello cluster" -n 16 --ignore-eos $flags --json 2>/dev/null | tail -n 1)"
  check "generate and run agree ($flags)" python3 -c "
import json,sys; g=json.loads(sys.argv[1]); r=json.loads(sys.argv[2])
assert g['tokens']==r['tokens'] and g['text']==r['text'] and g['finish_reason']==r['finish_reason'], (g, r)
assert len(g['tokens']) > 0, g" "$g" "$r"
done
check "run --stop ends the text before the stop string" python3 -c "
import json,sys; r=json.loads(sys.argv[1]); assert r['finish_reason']=='stop' and 'e' not in r['text'], r" "$r"
"$ctl" generate --coordinator "$ep" -p "hello" --top-p 0 >/dev/null 2>"$tmp/topp.err"; rc=$?
check "generate --top-p 0 is refused by the worker, as run refuses it" grep -q "top_p" "$tmp/topp.err"

# generate --json: the contract object on the last line.
out="$("$ctl" generate --coordinator "$ep" -p "hello cluster" -n 12 --ignore-eos --json 2>"$tmp/gen.err")"
rc=$?
check "generate --json exits 0" test $rc -eq 0
last="$(printf '%s\n' "$out" | tail -n 1)"
check "generate --json prints the contract object" python3 - "$last" <<'PY'
import json, sys
o = json.loads(sys.argv[1])
assert isinstance(o["tokens"], list) and len(o["tokens"]) == 12, o
assert all(isinstance(t, int) and 0 <= t < 400 for t in o["tokens"]), o
assert isinstance(o["text"], str), o
assert o["finish_reason"] == "length", o
u = o["usage"]
assert u["prompt_tokens"] > 0 and u["completion_tokens"] == 12, u
assert 0 <= u["cached_prompt_tokens"] <= u["prompt_tokens"], u
assert isinstance(o["timings"], dict) and o["timings"], o
for v in o["timings"].values():
    assert isinstance(v, (int, float)) and v >= 0, o["timings"]
PY
# The same prompt offline: greedy tokens equal.
off="$("$ctl" run -m "$tmp/tiny.gguf" -p "hello cluster" -n 12 --ignore-eos --threads 1 --json 2>/dev/null | tail -n 1)"
check "generate's greedy tokens equal folioctl run's" python3 -c "
import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert a['tokens']==b['tokens'], (a['tokens'], b['tokens'])" "$last" "$off"
# --no-migrate (the old failover rule) is accepted and, without a fault, changes nothing.
nm="$("$ctl" generate --coordinator "$ep" -p "hello cluster" -n 12 --ignore-eos --no-migrate --json 2>/dev/null | tail -n 1)"
check "generate --no-migrate gives the same tokens" python3 -c "
import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert a['tokens']==b['tokens'], (a, b)" "$nm" "$last"
# A prompt spelling special tokens: the coordinator parses them as folioctl run and tokenize do.
sp_prompt=$'<|im_start|>user hi<|im_end|>'
g="$("$ctl" generate --coordinator "$ep" -p "$sp_prompt" -n 8 --ignore-eos --json 2>/dev/null | tail -n 1)"
r="$("$ctl" run -m "$tmp/tiny.gguf" -p "$sp_prompt" -n 8 --ignore-eos --threads 1 --json 2>/dev/null | tail -n 1)"
k="$("$ctl" tokenize -m "$tmp/tiny.gguf" -p "$sp_prompt" --json 2>/dev/null | tail -n 1)"
check "special-token prompt: generate, run and tokenize agree" python3 -c "
import json,sys; g,r,k=(json.loads(a) for a in sys.argv[1:4]); assert k['tokens'][0]==1, k
assert g['tokens']==r['tokens'] and g['usage']['prompt_tokens']==r['usage']['prompt_tokens']==len(k['tokens']), (g, r, k)" \
  "$g" "$r" "$k"
# Speculative decoding: the same greedy tokens with every --spec through the cluster and in one
# process, usage counting drafted and accepted tokens (none with --spec none); out-of-range values
# refused naming the field.
plain="$("$ctl" generate --coordinator "$ep" -p "one two three one two three one two" -n 16 --ignore-eos \
  --temperature 0 --spec none --json 2>/dev/null | tail -n 1)"
check "generate --spec none drafts nothing" python3 -c "
import json,sys; u=json.loads(sys.argv[1])['usage']; assert u['drafted_tokens']==0 and u['accepted_tokens']==0, u" "$plain"
for spec in "auto" "ngram --max-draft 4" "medusa --max-draft 16"; do
  g="$("$ctl" generate --coordinator "$ep" -p "one two three one two three one two" -n 16 --ignore-eos \
    --temperature 0 --spec $spec --json 2>/dev/null | tail -n 1)"
  r="$("$ctl" run -m "$tmp/tiny.gguf" -p "one two three one two three one two" -n 16 --ignore-eos \
    --temperature 0 --spec $spec --threads 1 --json 2>/dev/null | tail -n 1)"
  check "--spec $spec: generate and run give the tokens of --spec none, usage counts drafts" python3 -c "
import json,sys; p,g,r=(json.loads(a) for a in sys.argv[1:4])
assert g['tokens']==r['tokens']==p['tokens'], (p['tokens'], g['tokens'], r['tokens'])
for u in (g['usage'], r['usage']): assert 0 <= u['accepted_tokens'] <= u['drafted_tokens'], u" "$plain" "$g" "$r"
done
"$ctl" generate --coordinator "$ep" -p "hello" --max-draft 17 >/dev/null 2>"$tmp/draft.err"
check "generate --max-draft 17 is refused naming max_draft" grep -q "max_draft" "$tmp/draft.err"
"$ctl" run -m "$tmp/tiny.gguf" -p "hello" --max-draft 17 >/dev/null 2>"$tmp/rdraft.err"
check "run --max-draft 17 is refused naming max_draft" grep -q "max_draft" "$tmp/rdraft.err"
"$ctl" generate --coordinator "$ep" -p "hello" --spec eagle >/dev/null 2>&1
check "generate --spec eagle is a usage error (exit 2)" test $? -eq 2

# Streamed (no --json): text as it comes.
"$ctl" generate --coordinator "$ep" -p "streamed text" -n 6 --ignore-eos >"$tmp/stream.out" 2>"$tmp/stream.err"
check "generate (streamed) exits 0" test $? -eq 0

# status --json
st="$("$ctl" status --coordinator "$ep" --json 2>"$tmp/status.err" | tail -n 1)"
check "status --json lists g0 and g1, both healthy" python3 - "$st" <<'PY'
import json, sys
o = json.loads(sys.argv[1])
groups = {g["name"]: g for g in o["groups"]}
assert set(groups) == {"g0", "g1"}, groups.keys()
assert all(g.get("healthy") for g in groups.values()), groups
for g in groups.values():  # speculation's totals and their mean (0 where none ran)
    l = g["load"]
    assert 0 <= l["accepted_tokens"] <= l["drafted_tokens"], l
    m = g["mean_accepted_length"]
    assert m == 0 if l["spec_seq_steps"] == 0 else abs(m - (1 + l["accepted_tokens"] / l["spec_seq_steps"])) < 1e-9, g
PY
"$ctl" status --coordinator "$ep" >"$tmp/status.txt" 2>&1
check "status shows an ACCEPT column" grep -q "ACCEPT" "$tmp/status.txt"
check "status counts requests migrated mid-stream" grep -q "migrated mid-stream" "$tmp/status.txt"

# drain g0: status shows it, new requests go to g1; undrain g0 clears it.
"$ctl" drain g0 --coordinator "$ep" >"$tmp/drain.out" 2>&1
check "drain g0 exits 0" test $? -eq 0
st="$("$ctl" status --coordinator "$ep" --json 2>/dev/null | tail -n 1)"
check "status shows g0 draining, g1 not" python3 -c "
import json,sys; g={x['name']:x for x in json.loads(sys.argv[1])['groups']}
assert g['g0'].get('draining') is True and not g['g1'].get('draining'), g" "$st"
all_g1=1
for i in 1 2 3 4; do
  o="$("$ctl" generate --coordinator "$ep" -p "while draining $i" -n 4 --ignore-eos --json 2>/dev/null | tail -n 1)"
  python3 -c "import json,sys; o=json.loads(sys.argv[1]); assert len(o['tokens'])==4" "$o" 2>/dev/null || all_g1=0
done
check "generate works while g0 drains" test $all_g1 -eq 1
"$ctl" drain g7 --coordinator "$ep" >/dev/null 2>"$tmp/drain7.err"
rc=$?
check "drain of an unknown group fails (exit 1..127)" test $rc -ge 1 -a $rc -lt 128
"$ctl" undrain g0 --coordinator "$ep" >/dev/null 2>&1
check "undrain g0 exits 0" test $? -eq 0
st="$("$ctl" status --coordinator "$ep" --json 2>/dev/null | tail -n 1)"
check "status shows no group draining" python3 -c "
import json,sys; g=json.loads(sys.argv[1])['groups']; assert not any(x.get('draining') for x in g), g" "$st"

# SIGTERM to up: it exits, and takes every process of the cluster with it.
pids_before="$(cluster_pids | tr '\n' ' ')"
kill -TERM "$up_pid"
exited=0
for _ in $(seq 1 $((50 * slow))); do
  if ! kill -0 "$up_pid" 2>/dev/null; then exited=1; break; fi
  sleep 0.2
done
check "folioctl up exits on SIGTERM" test $exited -eq 1
wait "$up_pid" 2>/dev/null
rc=$?
check "folioctl up exits with status 0 or 143 after SIGTERM (got $rc)" test $rc -eq 0 -o $rc -eq 143
up_pid=""
left=""
for _ in $(seq 1 $((25 * slow))); do
  left="$(cluster_pids | tr '\n' ' ')"
  [ -z "$left" ] && break
  sleep 0.2
done
check "no coordinator or worker is left (were: $pids_before; left: ${left:-none})" test -z "$left"
"$ctl" health --coordinator "$ep" >/dev/null 2>&1
check "health fails once the cluster is gone" test $? -ne 0

[ $fails -eq 0 ] || { echo "--- up stderr"; tail -n 20 "$tmp/up.err"; echo "$fails check(s) failed"; exit 1; }
echo "all checks passed"
