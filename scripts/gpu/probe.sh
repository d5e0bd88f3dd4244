# One GPU call: prepare the corpus, then 30 steps of each preset to measure throughput.
source scripts/gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv
time prepare_data
cp $DATA/manifest.json $OUT/manifest.json
tar czf $OUT/tokenizer.tgz -C $DATA tokenizer files.tsv
probe() {  # name, extra args
  local name=$1; shift
  python3 -m molae.train --out /tmp/probe-$name --data $DATA --steps 30 --set warmup=10 --set log_every=10 \
    --set eval_every=30 --set ckpt_every=1000 --no-progress "$@" 2>&1 | grep -v Warning | tail -6 || { echo "probe $name failed"; return 0; }
  python3 -c "import json,sys; print(json.dumps(dict(probe='$name', **json.load(open('/tmp/probe-$name/summary.json')))))" >> $OUT/probe.jsonl
}
probe qwen --config ref-qwen2-moe
probe mixtral --config ref-mixtral
probe deepseek --config ref-deepseek-v3
probe pre-moe --config pretrain-moe
probe pre-molae3 --config pretrain-moe --set molae.latent_dim=256 --set 'molae.projections=["gate","up","down"]'
probe pre-latentmoe --config pretrain-moe --set molae.latent_moe_dim=256 --set model.num_experts=32 --set model.num_experts_per_tok=4
probe qwen-compile --config ref-qwen2-moe --compile
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py -k 'cuda or autocast or latent_moe' 2>&1 | tail -5 || true
