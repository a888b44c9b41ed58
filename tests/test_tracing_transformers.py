"""Models no one here wrote: Hugging Face ResNet, ViT, ConvNeXt and MobileNetV2 image classifiers, a BERT
text classifier and a GPT-2 language model, built from small configs with random weights (no download), trace with nothing
left out, pass check_spec within float32 rounding, and weight matching recovers a planted
permutation of each exactly."""
import pytest
import torch

from starfast import ParamSpace, check_spec, match_weights, permute, trace_spec

transformers = pytest.importorskip("transformers")


def resnet():
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                       layer_type="bottleneck", num_labels=3)
    return transformers.ResNetForImageClassification(config), lambda g: torch.randn(4, 3, 32, 32, generator=g)


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(config), lambda g: torch.randn(2, 3, 8, 8, generator=g)


def convnext():
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 2], num_stages=2,
                                         patch_size=2, num_labels=3)
    return transformers.ConvNextForImageClassification(config), lambda g: torch.randn(2, 3, 16, 16, generator=g)


def bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)

    def inputs(g):
        ids = torch.randint(0, 50, (2, 7), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    return transformers.BertForSequenceClassification(config), inputs


def mobilenet():
    config = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    return transformers.MobileNetV2ForImageClassification(config), lambda g: torch.randn(2, 3, 32, 32, generator=g)


def gpt2():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)

    def inputs(g):
        return {"input_ids": torch.randint(0, 50, (2, 7), generator=g), "use_cache": False}

    return transformers.GPT2LMHeadModel(config), inputs


# (builder, the number of groups the model has, the tensors its first group — the stem or stream — must reach)
MODELS = {
    # ResNet: stem/stage-1 stream, stage-2 stream (a projection shortcut), 2 inner groups per bottleneck.
    "resnet": (resnet, 2 + 2 * 3, ["resnet.embedder.embedder.convolution.weight", "resnet.encoder.stages.0.layers.0.layer.2.normalization.running_var"]),
    # ViT: the stream, per layer 2 query/key heads, 2 value heads and the MLP.
    "vit": (vit, 1 + 2 * 5, ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.weight"]),
    # ConvNeXt: two streams (a downsampling conv between them), one MLP group per layer.
    "convnext": (convnext, 2 + 3, ["convnext.embeddings.patch_embeddings.weight", "convnext.encoder.stages.0.layers.0.dwconv.weight"]),
    # MobileNetV2 (depthwise convs tie their channels; ReLU6; batch statistics of 2 examples at 1x1 pixels).
    "mobilenet": (mobilenet, 25, ["mobilenet_v2.conv_stem.first_conv.convolution.weight", "mobilenet_v2.conv_stem.conv_3x3.convolution.weight"]),
    # GPT-2: Conv1D layers (addmm on [in, out] weights), one fused q/k/v projection split in three,
    # the LM head tied to the token embeddings (both names carry the stream).
    "gpt2": (gpt2, 1 + 2 * 5, ["transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"]),
    # BERT: the stream (word, position and token-type embeddings), per layer 2 + 2 heads and the MLP, the pooler.
    "bert": (bert, 1 + 2 * 5 + 1, ["bert.embeddings.word_embeddings.weight", "bert.embeddings.token_type_embeddings.weight", "bert.pooler.dense.weight"]),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_model_traces_checks_and_recovers_a_planted_permutation(name, rng):
    builder, group_count, stream_tensors = MODELS[name]
    with torch.random.fork_rng():  # random weights from the test's seed; the global generator left as it was
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        model, make_input = builder()
    model.eval()
    example = make_input(rng)
    spec = trace_spec(model, example, strict=True)
    assert len(spec.groups) == group_count, [(g.name, g.size) for g in spec.groups]
    first = spec.groups[0]
    assert set(stream_tensors) <= {axis.name for axis in first.axes}, first.axes
    # GPT-2's Conv1D is not an nn.Linear: its attention and MLP units have no module input or
    # output on one axis to observe them at (the stream has its LayerNorms').
    assert spec.has_sites or (name == "gpt2" and spec.groups[0].sites), [g.name for g in spec.groups if not g.sites]

    report = check_spec(model, spec, example)
    assert report.passed and report.worst.largest <= report.tolerance, str(report)

    space = ParamSpace(model)
    row = space.flatten(model)
    planted = permute(row, spec.index_map(space, spec.random(rng)))
    assert not torch.equal(planted, row)
    result = match_weights(row, planted, spec, space=space, init="sorted")
    assert torch.equal(result.permuted, row), f"largest difference {float((result.permuted - row).abs().max()):.3g}"
