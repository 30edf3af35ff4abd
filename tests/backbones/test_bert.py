"""Bert and its converter against transformers' BertModel (random weights, fp32).

Checked on every hidden state (embeddings, each layer) and the pooled output, with padded rows (transformers'
attention_mask = ids != 0) and with token_type_ids given or not. The converter must give the same params from: the
files save_pretrained writes (.safetensors folder with config.json; transformers 5 writes the in-memory names), a
.bin with the index buffers of older transformers files, BertForMaskedLM / BertForPreTraining (``bert.`` + ``cls.*``
heads, dropped), the old ``gamma`` / ``beta`` LayerNorm names, and a foreign prefix; BERT-base at full size (slow).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel

from port_weights import bert as port
from port_weights.common import ConversionError
from torch_ref.backbones import max_abs, output_errors, perturb
from wimfris_jax.backbones.bert import Bert, bert_config
from wimfris_jax.io import flatten

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
)
TINY_CONFIG = dict(
    vocab_size=99, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=24, type_vocab_size=2, ln_eps=1e-12
)


def token_ids(b: int = 3, length: int = 9, vocab: int = 99, seed: int = 0) -> np.ndarray:
    """[CLS]=2, words, [SEP]=3, then [PAD]=0 rows of random lengths (one row full)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, length), np.int64)
    for r in range(b):
        n = length - 2 if r == b - 1 else int(rng.integers(1, length - 2))
        ids[r, : n + 2] = [2, *rng.integers(5, vocab, n), 3]
    return ids


def type_ids(ids: np.ndarray) -> np.ndarray:
    """Segment B (type 1) from the middle of each row's words on; 0 on padding, as a tokenizer of pairs gives."""
    out = np.zeros_like(ids)
    for r, row in enumerate(ids):
        n = int((row != 0).sum())
        out[r, n // 2 : n] = 1
    return out


@pytest.fixture(scope="module")
def pretraining() -> BertForPreTraining:
    torch.manual_seed(0)
    return perturb(BertForPreTraining(BertConfig(**TINY)))


@pytest.fixture(scope="module")
def ref(pretraining):
    """(params, meta) from the in-memory BertModel state dict (transformers 5 names)."""
    return port.convert_state_dict(pretraining.bert.state_dict(), num_heads=4)


def hf_outputs(model: BertModel, ids: np.ndarray, tt: np.ndarray | None, mask: bool = True) -> dict:
    with torch.no_grad():
        out = model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy((ids != 0).astype(np.int64)) if mask else None,
            token_type_ids=None if tt is None else torch.from_numpy(tt),
            output_hidden_states=True,
        )
    hidden = [h.numpy() for h in out.hidden_states]
    return {"hidden_states": hidden, "last_hidden_state": hidden[-1], "pooled": out.pooler_output.numpy()}


def same_params(a, b) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# -------------------------------------------------------------------------------------------------- model
def test_parity_with_padding_and_token_types(pretraining, ref):
    params, meta = ref
    assert meta["config"] == {**TINY_CONFIG, "pooler": True} and meta["layout"] == "hf" and meta["dropped"] == []
    model = Bert(**meta["config"])
    ids = token_ids()
    apply = jax.jit(model.apply)
    for tt in (None, type_ids(ids)):
        ours = apply({"params": params}, jnp.asarray(ids), None if tt is None else jnp.asarray(tt))
        theirs = hf_outputs(pretraining.bert, ids, tt)
        errs = output_errors(ours, theirs)
        assert max(errs.values()) <= 1e-5, (tt is not None, errs)
    # the padding mask and the token types matter (so both were exercised above)
    unmasked = hf_outputs(pretraining.bert, ids, tt, mask=False)["hidden_states"][-1]
    assert max_abs(ours["last_hidden_state"][0], unmasked[0]) > 1e-2
    zero_types = apply({"params": params}, jnp.asarray(ids))["last_hidden_state"]
    assert max_abs(ours["last_hidden_state"], zero_types) > 1e-2


class _Parent(nn.Module):
    """Runs Bert layer by layer with its own module in between (a fusion after layer 0)."""

    config: dict

    def setup(self):
        self.text = Bert(**self.config)
        self.fuse = nn.Dense(self.config["width"])

    def __call__(self, ids, scale):
        pad = ids == 0
        x = self.text.embed(ids)
        for i in range(self.config["depth"]):
            x = self.text.layer(i, x, pad)
            if i == 0:
                x = x + scale * self.fuse(x)
        return x, self.text.pool(x)


def test_layer_by_layer_api(ref):
    params, meta = ref
    ids = jnp.asarray(token_ids(b=2, length=7, seed=1))
    model = Bert(**meta["config"])
    whole = model.apply({"params": params}, ids)
    x = model.apply({"params": params}, ids, method=Bert.embed)
    for i in range(model.depth):
        x = model.apply({"params": params}, i, x, ids == 0, method=Bert.layer)
    np.testing.assert_array_equal(x, whole["last_hidden_state"])
    np.testing.assert_array_equal(model.apply({"params": params}, x, method=Bert.pool), whole["pooled"])

    parent = _Parent(meta["config"])
    shapes = jax.eval_shape(parent.init, jax.random.key(0), ids, 1.0)["params"]
    assert set(shapes) == {"text", "fuse"}
    fuse = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes["fuse"])
    variables = {"params": {"text": params, "fuse": fuse}}
    x0, p0 = parent.apply(variables, ids, 0.0)
    np.testing.assert_allclose(x0, whole["last_hidden_state"], atol=1e-6)
    np.testing.assert_allclose(p0, whole["pooled"], atol=1e-6)
    x1, _ = parent.apply(variables, ids, 1.0)
    assert max_abs(x1, x0) > 1e-3

    nopool = Bert(**TINY_CONFIG)
    assert "pooled" not in nopool.apply({"params": {k: v for k, v in params.items() if k != "pooler_dense"}}, ids)
    with pytest.raises(ValueError, match="exceeds the position table's max_positions 24"):
        jax.eval_shape(nopool.init, jax.random.key(0), jnp.ones((1, 25), jnp.int32))
    with pytest.raises(ValueError, match="no pooler"):
        nopool.apply({"params": {}}, x, method=Bert.pool)


# -------------------------------------------------------------------------------------------------- converter
def with_layernorm_names(sd: dict, weight: str, bias: str) -> dict:
    return {
        k.replace("LayerNorm.weight", f"LayerNorm.{weight}").replace("LayerNorm.bias", f"LayerNorm.{bias}"): v
        for k, v in sd.items()
    }


@pytest.mark.parametrize("fmt", ["folder_safetensors", "bin_buffers", "mlm_folder", "pretraining_gamma_beta"])
def test_converter_layouts(fmt, pretraining, ref, tmp_path):
    params, _ = ref
    bert_sd = pretraining.bert.state_dict()
    kw = {}
    if fmt == "folder_safetensors":  # save_pretrained: model.safetensors + config.json (4 heads from it)
        pretraining.bert.save_pretrained(tmp_path)
        assert set(load_file(str(tmp_path / "model.safetensors"))) == set(bert_sd)  # the v5 in-memory names
        src, layout, dropped = str(tmp_path), "hf", []
    elif fmt == "bin_buffers":  # torch.save of a transformers 4 state dict, with its embeddings' index buffers
        sd = dict(bert_sd)
        sd["embeddings.position_ids"] = torch.arange(24)[None]
        sd["embeddings.token_type_ids"] = torch.zeros(1, 24, dtype=torch.long)
        src, layout, kw = str(tmp_path / "pytorch_model.bin"), "hf", dict(num_heads=4)
        torch.save(sd, src)
        dropped = ["embeddings.position_ids", "embeddings.token_type_ids"]
    elif fmt == "mlm_folder":  # BertForMaskedLM: bert.* without pooler, cls.predictions.* (decoder tied: not saved)
        mlm = BertForMaskedLM(BertConfig(**TINY))
        missing, unexpected = mlm.bert.load_state_dict(bert_sd, strict=False)
        assert not missing and set(unexpected) == {"pooler.dense.weight", "pooler.dense.bias"}
        mlm.save_pretrained(tmp_path)
        params = {k: v for k, v in params.items() if k != "pooler_dense"}
        src, layout = str(tmp_path), "hf-heads"
        dropped = sorted(k for k in load_file(str(tmp_path / "model.safetensors")) if k.startswith("cls."))
        assert "cls.predictions.transform.dense.weight" in dropped
    else:  # the original bert-base-uncased pytorch_model.bin: gamma/beta, bert.* + every cls.* head
        sd = with_layernorm_names(pretraining.state_dict(), "gamma", "beta")
        sd["bert.embeddings.position_ids"] = torch.arange(24)[None]
        src, layout, kw = str(tmp_path / "bert_pretraining.bin"), "hf-heads", dict(num_heads=4)
        torch.save(sd, src)
        dropped = sorted(["bert.embeddings.position_ids"] + [k for k in sd if k.startswith("cls.")])
        assert "cls.predictions.transform.LayerNorm.gamma" in dropped and "cls.seq_relationship.weight" in dropped
    got, meta = port.from_checkpoint(src, **kw)
    assert meta["layout"] == layout and meta["prefix"] == "" and meta["skipped"] == 0
    assert meta["dropped"] == dropped
    assert meta["config"] == {**TINY_CONFIG, "pooler": fmt != "mlm_folder"}
    assert meta["source_dtypes"] == {"float32": len(flatten(params))}  # one source tensor per parameter
    assert same_params(got, params)


def test_foreign_prefix_is_kept_and_the_rest_skipped(pretraining, ref):
    params, _ = ref
    sd = {f"text_encoder.{k}": v for k, v in pretraining.state_dict().items()}  # bert.* and cls.*
    sd["visual.proj.weight"] = torch.zeros(2, 2)
    sd["text_encoder.bert.embeddings.position_ids"] = torch.arange(24)[None]
    got, meta = port.convert_state_dict(sd, num_heads=4)
    assert (meta["layout"], meta["prefix"], meta["skipped"]) == ("hf-heads", "text_encoder.", 1)
    assert "text_encoder.cls.seq_relationship.bias" in meta["dropped"]
    assert "text_encoder.bert.embeddings.position_ids" in meta["dropped"]
    assert same_params(got, params)
    old = with_layernorm_names(pretraining.bert.state_dict(), "gamma", "beta")
    sd2 = {f"text_encoder.{k}": v for k, v in old.items()}
    got2, meta2 = port.convert_state_dict(sd2, num_heads=4)
    assert (meta2["layout"], meta2["prefix"]) == ("hf", "text_encoder.") and same_params(got2, params)
    with pytest.raises(ConversionError, match=r"found 2 \(\['text_encoder.', 'other.'\]\) BERT word embedding"):
        port.convert_state_dict({**sd2, "other.embeddings.word_embeddings.weight": torch.zeros(3, 32)})


def test_bad_checkpoint_names_every_key(pretraining, tmp_path):
    sd = dict(pretraining.bert.state_dict())
    del sd["encoder.layer.1.intermediate.dense.bias"]  # missing
    del sd["encoder.layer.0.output.LayerNorm.weight"]  # missing, either spelling accepted
    sd["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(4, 32)  # unexpected
    src = str(tmp_path / "broken.bin")
    torch.save(sd, src)
    with pytest.raises(ConversionError) as e:
        port.from_checkpoint(src, num_heads=4)
    msg = str(e.value)
    assert msg.startswith(src) and "3 problem(s)" in msg, msg
    assert "unexpected key 'encoder.layer.0.attention.self.rotary.weight' (4, 32)" in msg
    assert "'layers_1/mlp/fc1/bias' (64,) has no source key; looked for 'encoder.layer.1.intermediate.dense.bias'" in (
        msg
    )
    assert (
        "'layers_0/mlp_norm/scale' (32,) has no source key; looked for 'encoder.layer.0.output.LayerNorm.weight' or "
        "'encoder.layer.0.output.LayerNorm.gamma'" in msg
    )


def test_config_json_checks_and_presets():
    sd = BertModel(BertConfig(**TINY)).state_dict()
    with pytest.raises(ConversionError, match="hidden_size=768 but the BERT weights have width 32"):
        port.convert_state_dict(sd, hf_config=dict(hidden_size=768, num_attention_heads=12))
    with pytest.raises(ConversionError, match="hidden_act='gelu_new'; Bert implements the exact"):
        port.convert_state_dict(sd, hf_config=dict(hidden_act="gelu_new"))
    with pytest.raises(ConversionError, match="position_embedding_type='relative_key'"):
        port.convert_state_dict(sd, hf_config=dict(position_embedding_type="relative_key"))
    _, meta = port.convert_state_dict(sd, hf_config=dict(num_attention_heads=8, layer_norm_eps=1e-7))
    assert (meta["config"]["num_heads"], meta["config"]["ln_eps"]) == (8, 1e-7)
    assert port.convert_state_dict(sd)[1]["config"]["num_heads"] == 1  # head size 64 (at least one head)
    # presets = what the converter infers from transformers' bert-base / bert-large (meta device: shapes only)
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    for name, hf in (("base", BertConfig()), ("large", BertConfig(**large))):
        with torch.device("meta"):
            sd = BertForPreTraining(hf).state_dict()
        layout = port.detect_layout(sd)
        assert port.infer_config(sd, layout) == {**bert_config(name), "pooler": True}, name  # heads = width // 64
        assert port.infer_config(sd, layout, hf_config=hf.to_dict()) == {**bert_config(name), "pooler": True}
    assert Bert().width == 768 and Bert(**bert_config("large")).depth == 24
    with pytest.raises(ValueError, match="unknown BERT preset 'huge'"):
        bert_config("huge")


def test_cli_writes_loadable_params(pretraining, ref, tmp_path):
    from port_weights.__main__ import main
    from wimfris_jax.backbones import load_backbone
    from wimfris_jax.io import load_params

    pretraining.save_pretrained(tmp_path / "hf")  # BertForPreTraining folder with config.json
    assert main(["bert", str(tmp_path / "hf"), str(tmp_path / "out.msgpack")]) == 0
    params, meta = load_params(tmp_path / "out.msgpack")
    assert meta["family"] == "bert" and meta["layout"] == "hf-heads" and meta["config"]["num_heads"] == 4
    assert same_params(params, ref[0])
    net, variables = load_backbone(tmp_path / "out.msgpack")  # the converted file on its own
    ids = token_ids()
    errs = output_errors(net.apply(variables, jnp.asarray(ids)), hf_outputs(pretraining.bert, ids, None))
    assert max(errs.values()) <= 1e-5
    assert main(["bert", str(tmp_path / "nothing.bin"), str(tmp_path / "x.msgpack")]) == 1


@pytest.mark.slow
def test_full_size_bert_base():
    """BERT-base (30522 x 768, 12 layers, 12 heads, pooler), batch 2, length 21 (CrossVLT's), padded rows."""
    torch.manual_seed(0)
    model = perturb(BertModel(BertConfig()), std=0.02)
    params, meta = port.convert_state_dict(model.state_dict())  # heads: 768 // 64
    assert meta["config"] == {**bert_config("base"), "pooler": True}
    ids = token_ids(b=2, length=21, vocab=30522, seed=3)
    ours = jax.jit(Bert(**meta["config"]).apply)({"params": params}, jnp.asarray(ids))
    errs = output_errors(ours, hf_outputs(model, ids, None))
    assert max(errs.values()) <= 1e-4, errs
