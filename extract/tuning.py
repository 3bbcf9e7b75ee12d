"""Tuned backbones: LoRA on the registry's target modules, and a fine-tuning run's weights read back.

`add_lora` wraps a loaded backbone with PEFT LoRA (rank r, alpha 2r unless given, dropout 0.05: the
paper's rank 4, alpha 8) on the modules the registry names: attention query and key projections, or the
convolutions inside ResNet's residual blocks. Only the adapter weights train. A timm tower's fused
qkv projections are split first (`lora_layout`), so that the values stay untouched.

`read_run` loads a fine-tuning run left in its folder (heads/finetune/loop.py, checkpoint format in
extract/checkpoint.py) once; `run_tag` names
its store and `apply_run` gives the backbone its tuning: the LoRA adapter merged into the weights,
or the full weights. The run must have started from the same base weights; the info `apply_run`
returns is what the embedding store's fingerprint records about it.
"""

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from iqa.extract.backbones import BackboneLoadError, PooledBackbone, state_sha256, weights_sha256
from iqa.extract.registry import BackboneSpec, lora_target_modules
from iqa.extract.checkpoint import checkpoint_path, load_checkpoint, run_name
from iqa.extract.timm_tower import split_qkv

LORA_DROPOUT = 0.05


def lora_layout(backbone: PooledBackbone) -> PooledBackbone:
    """The backbone with LoRA's target modules as modules of their own: a timm tower's fused qkv split
    into q, k, v (the same function); transformers models have them already."""
    return split_qkv(backbone) if backbone.spec.pooling == "timm_tap" else backbone


def add_lora(backbone: PooledBackbone, spec: BackboneSpec, rank: int, alpha: float | None = None) -> PeftModel:
    backbone = lora_layout(backbone)
    targets = lora_target_modules(spec, [name for name, _ in backbone.named_modules()])
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=LORA_DROPOUT, target_modules=targets)
    return get_peft_model(backbone, config)


def read_run(run_dir: Path) -> dict:
    """The run's last checkpoint (config, fingerprint, trained weights); a frozen run is refused."""
    state = load_checkpoint(run_dir)
    if state is None:
        raise BackboneLoadError(f"no fine-tuning checkpoint at {checkpoint_path(run_dir)}")
    if state["config"]["regime"] == "frozen":
        raise BackboneLoadError(f"{run_dir} is a frozen-backbone run: its backbone is the base one, use no `adapter`")
    return state


def run_tag(state: dict, dataset: str) -> str:
    """Store tag of a run's tuned embeddings: lora-r4-sig-s8 (tiny-... for a tiny model, ...-from-<set> across sets)."""
    config = state["config"]
    tag = run_name(config)
    if config["tag"]:
        tag = f"{config['tag']}-{tag}"
    if config["train_dataset"] != dataset:
        tag += f"-from-{config['train_dataset']}"
    return tag


def apply_run(backbone: PooledBackbone, spec: BackboneSpec, run_dir: Path, state: dict) -> tuple[PooledBackbone, dict]:
    """(tuned backbone, what the store fingerprint records about the run); `state` is `read_run(run_dir)`."""
    config, trained = state["config"], state["backbone"]
    if config["backbone"] != spec.key:
        raise BackboneLoadError(f"{run_dir} tuned {config['backbone']}, not {spec.key}")
    base_sha = state["fingerprint"]["weights_sha256"]
    if weights_sha256(backbone) != base_sha:
        raise BackboneLoadError(
            f"{run_dir} started from other {spec.key} weights ({state['fingerprint']['model_id']}); "
            f"pass the same `model` / `weights` as the run"
        )
    if config["regime"] == "lora":
        wrapped = add_lora(backbone, spec, config["lora_rank"], config.get("lora_alpha"))
        set_peft_model_state_dict(wrapped, trained)
        backbone = wrapped.merge_and_unload()
    else:
        backbone.load_state_dict(trained)
    info = {"run": str(Path(run_dir).resolve()), "regime": config["regime"], "epoch": state["epoch"],
            "base_weights_sha256": base_sha, "trained_sha256": state_sha256(trained)}
    return backbone.eval(), info
