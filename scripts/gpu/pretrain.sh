# [4]'s pretraining comparison (results/pretrain_same_tokens.md): the same tokens (seed, steps, batch) for every
# variant of the pretrain-moe preset, one after another on one GPU.
source scripts/gpu/common.sh
STEPS=${1:-550}
[ -f $DATA/manifest.json ] || prepare_data results/data/tokenizer 2>&1 | tail -1
cp $DATA/manifest.json $OUT/manifest.json
variant() {  # name, overrides...
  local name=$1; shift
  rm -rf /tmp/pre-$name
  python3 -m molae.train --config pretrain-moe --data $DATA --out /tmp/pre-$name --steps $STEPS \
    --set warmup=50 --set eval_every=110 --set ckpt_every=100000 --no-progress "$@" 2>&1 \
    | grep -E "^final|event|Error|error" || true
  collect_run /tmp/pre-$name $name >> $OUT/pretrain.jsonl
}
variant moe --set molae=null
variant molae-g1-upgate --set molae.latent_dim=256
variant molae-g1-all --set molae.latent_dim=256 --set 'molae.projections=["gate","up","down"]'
variant molae-g4-upgate --set molae.latent_dim=256 --set molae.groups=4
variant latentmoe --set molae.latent_moe_dim=256 --set model.num_experts=32 --set model.num_experts_per_tok=4
variant moe-small --set molae=null --set model.moe_intermediate_size=272
