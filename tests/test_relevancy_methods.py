"""Hand-worked examples for every relevancy rule; the arithmetic is written out beside each number."""

from __future__ import annotations

import numpy as np
import pytest

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy import (
    Captured,
    attention_gradcam,
    compute_relevancy,
    generic_relevancy,
    raw_attention,
    rollout,
    transformer_attribution,
)

# --- Single stream: 3 tokens [text, [CLS] (special, read by the answer head), image], 2 layers, 2 heads.
ATTENTION = np.array(
    [
        [  # layer 0
            [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]],
            [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]],
        ],
        [  # layer 1
            [[0.0, 1.0, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]],
            [[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
        ],
    ]
)
GRADIENT = np.array(
    [
        [
            np.full((3, 3), 2.0),
            [[-2.0, 0.0, 0.0], [2.0, 0.0, -2.0], [0.0, 0.0, 2.0]],
        ],
        [
            np.full((3, 3), 4.0),
            [[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]],
        ],
    ]
)
# ∇A ⊙ A per head, clamped per head, then averaged:
# layer 0: head 0 [[1,1,0],[0,1,1],[1,0,1]], head 1 [[-2,0,0],[1,0,-1],[0,0,2]] -> [[0,0,0],[1,0,0],[0,0,2]]
#   Ā0 = [[.5,.5,0],[.5,.5,.5],[.5,0,1.5]]   (mean first, then clamp, would give [[0,.5,0],[.5,.5,0],[.5,0,1.5]])
# layer 1: head 0 [[0,4,0],[1,2,1],[0,2,2]], head 1 [[1,0,1],[0,0,-1],[2,0,0]] -> [[1,0,1],[0,0,0],[2,0,0]]
#   Ā1 = [[.5,2,.5],[.5,1,.5],[1,1,1]]


def single_stream(**changes) -> Captured:
    """The 3-token example, optionally with fields replaced."""
    fields = {
        "attention": ATTENTION,
        "attention_gradient": GRADIENT,
        "layer_kind": ["self", "self"],
        "modality": ["text", "special", "image"],
        "readout_tokens": {"answer": 1},
        "target": "yes",
    }
    fields.update(changes)
    return Captured(**fields)


def test_generic_self_attention_rule_by_hand():
    # R1 = I + Ā0 = [[1.5,.5,0],[.5,1.5,.5],[.5,0,2.5]]
    # R2 = R1 + Ā1·R1; row 1 of Ā1·R1 = .5*[1.5,.5,0] + 1*[.5,1.5,.5] + .5*[.5,0,2.5] = [1.5,1.75,1.75]
    # R2[1] = [.5,1.5,.5] + [1.5,1.75,1.75] = [2,3.25,2.25]; own entry (token 1) -> 0
    result = generic_relevancy(single_stream())
    np.testing.assert_allclose(result.values, [2.0, 0.0, 2.25])
    assert result.readout_tokens == [1]
    assert result.options == {"readout": "answer", "start_layer": 0}
    assert result.target == "yes"
    np.testing.assert_allclose(result.text, [2.0])
    np.testing.assert_allclose(result.image, [2.25])
    np.testing.assert_allclose(result.part("special"), [0.0])


def test_generic_clamps_each_head_before_the_head_mean():
    # Layer 0 alone: R = I + Ā0, row 1 = [.5, 1.5, .5] -> [.5, 0, .5].
    # Clamping after the mean would give Ā0[1] = [.5,.5,0] and so [.5, 0, 0].
    only_first = single_stream(attention=ATTENTION[:1], attention_gradient=GRADIENT[:1], layer_kind=["self"])
    np.testing.assert_allclose(generic_relevancy(only_first).values, [0.5, 0.0, 0.5])


def test_generic_start_layer_uses_the_last_layers_only():
    # start_layer=-1: R = I + Ā1, row 1 = [.5, 2, .5] -> [.5, 0, .5]; start_layer=1 is the same layer.
    np.testing.assert_allclose(generic_relevancy(single_stream(), start_layer=-1).values, [0.5, 0.0, 0.5])
    np.testing.assert_allclose(generic_relevancy(single_stream(), start_layer=1).values, [0.5, 0.0, 0.5])
    with pytest.raises(VLIError, match="start_layer"):
        generic_relevancy(single_stream(), start_layer=2)


def test_raw_attention_reads_the_last_layer_row_of_the_readout_token():
    # E_h[A1][1] = ([.25,.5,.25] + [0,0,1]) / 2 = [.125,.25,.625]; own entry -> 0
    np.testing.assert_allclose(raw_attention(single_stream()).values, [0.125, 0.0, 0.625])


def test_readout_token_is_taken_from_the_adapter_not_position_zero():
    # Reading token 0 instead: E_h[A1][0] = ([0,1,0] + [.5,0,.5]) / 2 = [.25,.5,.25] -> [0,.5,.25]
    moved = single_stream(readout_tokens={"answer": 0})
    np.testing.assert_allclose(raw_attention(moved).values, [0.0, 0.5, 0.25])


def test_rollout_with_row_renormalisation():
    # E_h[A0] = [[.75,.25,0],[.25,.25,.5],[.25,0,.75]]; + I, rows / 2:
    #   M0 = [[.875,.125,0],[.125,.625,.25],[.125,0,.875]]
    # E_h[A1] = [[.25,.5,.25],[.125,.25,.625],[.5,.25,.25]]; M1[1] = [.125,1.25,.625] / 2 = [.0625,.625,.3125]
    # (M1·M0)[1] = .0625*M0[0] + .625*M0[1] + .3125*M0[2]
    #            = [.0546875,.0078125,0] + [.078125,.390625,.15625] + [.0390625,0,.2734375]
    #            = [.171875,.3984375,.4296875]
    result = rollout(single_stream())
    np.testing.assert_allclose(result.values, [0.171875, 0.0, 0.4296875])
    assert result.options == {"readout": "answer", "start_layer": 0, "renormalize": True}


def test_rollout_without_row_renormalisation():
    # (E_h[A1] + I)[1] · (E_h[A0] + I) = .125*[1.75,.25,0] + 1.25*[.25,1.25,.5] + .625*[.25,0,1.75]
    #   = [.21875,.03125,0] + [.3125,1.5625,.625] + [.15625,0,1.09375] = [.6875,1.59375,1.71875]
    result = rollout(single_stream(), renormalize=False)
    np.testing.assert_allclose(result.values, [0.6875, 0.0, 1.71875])


def test_attention_gradcam_by_hand():
    # Layer 1: w0 = mean(all 4) = 4, w1 = (6 - 3 + 6) / 9 = 1
    # row 1 of E_h[w_h A_h] = (4*[.25,.5,.25] + 1*[0,0,1]) / 2 = [.5,1,1], clamp keeps it -> [.5,0,1]
    np.testing.assert_allclose(attention_gradcam(single_stream()).values, [0.5, 0.0, 1.0])


def test_attention_gradcam_clamps_after_the_head_mean():
    # Negated gradients: w = -4, -1, so every entry of E_h[w_h A_h] row 1 is <= 0 -> all 0.
    negated = single_stream(attention_gradient=-GRADIENT)
    np.testing.assert_allclose(attention_gradcam(negated).values, [0.0, 0.0, 0.0])


def test_transformer_attribution_combines_given_lrp_relevances():
    # With R^A = 2A every Ā doubles: (I + 2Ā1)[1] = [1,3,1]; I + 2Ā0 = [[2,1,0],[1,2,1],[1,0,4]]
    # row 1 = 1*[2,1,0] + 3*[1,2,1] + 1*[1,0,4] = [6,7,7] -> [6,0,7]
    captured = single_stream(attention_relevance=2 * ATTENTION)
    np.testing.assert_allclose(transformer_attribution(captured).values, [6.0, 0.0, 7.0])
    # start_layer=1: (I + 2Ā1)[1] = [1,3,1] -> [1,0,1]
    np.testing.assert_allclose(transformer_attribution(captured, start_layer=1).values, [1.0, 0.0, 1.0])
    with pytest.raises(VLIError, match="LRP"):
        transformer_attribution(single_stream())


def test_methods_that_need_gradients_say_how_to_get_them():
    without = single_stream(attention_gradient=None)
    for method in ("generic", "attention_gradcam"):
        with pytest.raises(VLIError, match="gradients=True"):
            compute_relevancy(without, method)
    np.testing.assert_allclose(compute_relevancy(without, "raw_attention").values, [0.125, 0.0, 0.625])


# --- Helpers for stream models: place each module's block into the full (layer, head, T, T) frame.


def framed(n_tokens: int, modules: list[tuple[list[int], list[int], list, list]]) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame attention and gradient, one head, from (query tokens, key tokens, A block, ∇A block)."""
    attention = np.zeros((len(modules), 1, n_tokens, n_tokens))
    gradient = np.zeros_like(attention)
    for layer, (queries, keys, attention_block, gradient_block) in enumerate(modules):
        attention[layer, 0][np.ix_(queries, keys)] = attention_block
        gradient[layer, 0][np.ix_(queries, keys)] = gradient_block
    return attention, gradient


# --- Co-attention (dual stream): tokens [[CLS] (special, text stream, read by the answer head), word, patch].
TEXT_STREAM, IMAGE_STREAM = [0, 1], [2]
CO_ATTENTION_MODULES = [
    # 0 text_self: ∇A⊙A = [[1,0],[-1,2]] -> Ā = [[1,0],[0,2]]; R_tt = [[2,0],[0,3]]
    (TEXT_STREAM, TEXT_STREAM, [[1.0, 0.0], [0.5, 0.5]], [[1.0, 7.0], [-2.0, 4.0]]),
    # 1 image_self: Ā = 3; R_ii = 4
    (IMAGE_STREAM, IMAGE_STREAM, [[1.0]], [[3.0]]),
    # 2 cross_image_to_text: ∇A⊙A = [[1,-3]] -> Ā_it = [[1,0]]
    (IMAGE_STREAM, TEXT_STREAM, [[0.25, 0.75]], [[4.0, -4.0]]),
    # 3 cross_text_to_image: Ā_ti = [[2],[1]]
    (TEXT_STREAM, IMAGE_STREAM, [[1.0], [1.0]], [[2.0], [1.0]]),
    # 4 text_self: Ā = [[1,1],[1,1]]
    (TEXT_STREAM, TEXT_STREAM, [[0.5, 0.5], [0.5, 0.5]], [[2.0, 2.0], [2.0, 2.0]]),
    # 5 cross_image_to_text: Ā_it = [[1,1]]
    (IMAGE_STREAM, TEXT_STREAM, [[0.5, 0.5]], [[2.0, 2.0]]),
    # 6 cross_text_to_image: Ā_ti = [[1],[2]]
    (TEXT_STREAM, IMAGE_STREAM, [[1.0], [1.0]], [[1.0], [2.0]]),
]
CO_ATTENTION_KINDS = [
    "text_self",
    "image_self",
    "cross_image_to_text",
    "cross_text_to_image",
    "text_self",
    "cross_image_to_text",
    "cross_text_to_image",
]


def co_attention(**changes) -> Captured:
    """The dual-stream example, optionally with fields replaced."""
    attention, gradient = framed(3, CO_ATTENTION_MODULES)
    fields = {
        "attention": attention,
        "attention_gradient": gradient,
        "layer_kind": CO_ATTENTION_KINDS,
        "modality": ["special", "text", "image"],
        "readout_tokens": {"answer": 0},
    }
    fields.update(changes)
    return Captured(**fields)


def test_generic_co_attention_rule_by_hand():
    # Before step (2,3): R_tt = [[2,0],[0,3]], R_ii = [[4]], R_ti = 0, R_it = 0.
    #   R̄_tt = rownorm([[1,0],[0,2]]) + I = [[2,0],[0,2]];  R̄_ii = 3/3 + 1 = 2
    #   ΔR_ti = R̄_ttᵀ·Ā_ti·R̄_ii = [[2,0],[0,2]]·[[2],[1]]·2 = [[8],[4]];  ΔR_tt = Ā_ti·R_it = 0
    #   ΔR_it = R̄_iiᵀ·Ā_it·R̄_tt = 2·[[1,0]]·[[2,0],[0,2]] = [[4,0]];     ΔR_ii = Ā_it·R_ti = 0
    #   (applying the image->text update first would make ΔR_tt = [[2],[1]]·[[4,0]] = [[8,0],[4,0]])
    # Layer 4: ΔR_tt = [[1,1],[1,1]]·[[2,0],[0,3]] = [[2,3],[2,3]]; ΔR_ti = [[1,1],[1,1]]·[[8],[4]] = [[12],[12]]
    #   R_tt = [[4,3],[2,6]], R_ti = [[20],[16]], R_it = [[4,0]], R_ii = [[4]]
    # Step (5,6): R̄_tt = rownorm([[3,3],[2,5]]) + I = [[1.5,.5],[2/7,12/7]];  R̄_ii = 2
    #   ΔR_ti = [[1.5,2/7],[.5,12/7]]·[[1],[2]]·2 = [[3 + 8/7],[1 + 48/7]] = [[29/7],[55/7]]
    #   ΔR_tt = [[1],[2]]·[[4,0]] = [[4,0],[8,0]]
    #   R_tt = [[8,3],[10,6]], R_ti = [[169/7],[167/7]]
    # Read at [CLS] (token 0), own entry 0: [0, 3, 169/7]
    result = generic_relevancy(co_attention())
    np.testing.assert_allclose(result.values, [0.0, 3.0, 169 / 7])
    np.testing.assert_allclose(result.image, [169 / 7])


def test_generic_last_cross_branch_not_read_by_the_head_does_not_matter():
    # Removing the last image->text module (layer 5) entirely leaves the [CLS] row unchanged.
    attention, gradient = framed(3, CO_ATTENTION_MODULES)
    without_last_image_branch = co_attention(
        attention=np.delete(attention, 5, axis=0),
        attention_gradient=np.delete(gradient, 5, axis=0),
        layer_kind=CO_ATTENTION_KINDS[:5] + CO_ATTENTION_KINDS[6:],
    )
    np.testing.assert_allclose(generic_relevancy(without_last_image_branch).values, [0.0, 3.0, 169 / 7])


def test_raw_attention_dual_stream_uses_last_text_self_and_last_text_to_image():
    # Text columns: layer 4 row 0 = [.5,.5] -> [0,.5]; image column: layer 6 row 0 = [1]
    np.testing.assert_allclose(raw_attention(co_attention()).values, [0.0, 0.5, 1.0])


def test_rollout_dual_stream_joins_through_the_last_cross_attention():
    # Text self layers 0, 4: M0 = ([[1,0],[.5,.5]] + I)/2 = [[1,0],[.25,.75]], M4 = [[.75,.25],[.25,.75]]
    #   J_t = M4·M0 = [[.8125,.1875],[.4375,.5625]]; image: M1 = (1 + 1)/2 = 1, J_i = 1
    # Last text->image module (6): E_h[A] = [[1],[1]]
    #   R_ti = J_tᵀ·[[1],[1]]·J_i: row 0 = column 0 of J_t summed = .8125 + .4375 = 1.25
    # Text columns: J_t[0] = [.8125,.1875] -> [0,.1875]
    np.testing.assert_allclose(rollout(co_attention()).values, [0.0, 0.1875, 1.25])


# --- Decoder cross-attention: [query (text, read out), patch, patch]; image encoder self layer, then cross.
DECODER_MODULES = [
    # 0 image_self: ∇A⊙A = [[1,-1],[1,3]] -> Ā = [[1,0],[1,3]]; R_ii = [[2,0],[1,4]]
    ([1, 2], [1, 2], [[0.5, 0.5], [0.25, 0.75]], [[2.0, -2.0], [4.0, 4.0]]),
    # 1 cross_text_to_image: Ā_qi = [[1, 1.5]]
    ([0], [1, 2], [[0.25, 0.75]], [[4.0, 2.0]]),
]


def test_generic_decoder_cross_attention_rule_by_hand():
    # R̄_qq: R_qq - I = 0, a row summing to 0 -> 0 (not NaN), + I = [[1]]
    # R̄_ii = rownorm([[1,0],[1,3]]) + I = [[1,0],[.25,.75]] + I = [[2,0],[.25,1.75]]
    # ΔR_qi = [[1]]·[[1,1.5]]·R̄_ii = [2 + .375, 2.625] = [2.375, 2.625]; ΔR_qq = Ā_qi·R_iq = 0 (R_iq = 0)
    attention, gradient = framed(3, DECODER_MODULES)
    captured = Captured(
        attention=attention,
        attention_gradient=gradient,
        layer_kind=["image_self", "cross_text_to_image"],
        modality=["text", "image", "image"],
        readout_tokens={"answer": 0},
    )
    result = generic_relevancy(captured)
    np.testing.assert_allclose(result.values, [0.0, 2.375, 2.625])
    assert np.isfinite(result.values).all()


# --- Dual encoder: [word (text), end-of-text (special, text readout), image [CLS] (special, image readout), patch]
DUAL_ENCODER_MODULES = [
    # 0 text_self: Ā = [[1,0],[1,1]]
    ([0, 1], [0, 1], [[1.0, 0.0], [0.5, 0.5]], [[1.0, 1.0], [2.0, 2.0]]),
    # 1 text_self: ∇A⊙A = [[1,1],[1,-3]] -> Ā = [[1,1],[1,0]]
    ([0, 1], [0, 1], [[0.5, 0.5], [0.25, 0.75]], [[2.0, 2.0], [4.0, -4.0]]),
    # 2 image_self: Ā = [[1,2],[0,1]]
    ([2, 3], [2, 3], [[0.5, 0.5], [0.5, 0.5]], [[2.0, 4.0], [0.0, 2.0]]),
    # 3 image_self: Ā = [[3,1],[0,1]]
    ([2, 3], [2, 3], [[0.75, 0.25], [0.0, 1.0]], [[4.0, 4.0], [1.0, 1.0]]),
]


def dual_encoder() -> Captured:
    """The dual-encoder example (target: the image-text similarity)."""
    attention, gradient = framed(4, DUAL_ENCODER_MODULES)
    return Captured(
        attention=attention,
        attention_gradient=gradient,
        layer_kind=["text_self", "text_self", "image_self", "image_self"],
        modality=["text", "special", "special", "image"],
        readout_tokens={"text": 1, "image": 2},
        target="score",
    )


def test_generic_dual_encoder_reads_each_tower_at_its_own_pooled_token():
    # Text tower: (I + Ā1)(I + Ā0) = [[2,1],[1,1]]·[[2,0],[1,2]] = [[5,2],[3,2]]; row of token 1 = [3,2] -> [3,0]
    # Image tower: (I + Ā3)(I + Ā2) = [[4,1],[0,2]]·[[2,2],[0,2]] = [[8,10],[0,4]]; row of token 2 = [8,10] -> [0,10]
    result = generic_relevancy(dual_encoder())
    np.testing.assert_allclose(result.values, [3.0, 0.0, 0.0, 10.0])
    assert result.readout == "text+image"
    assert result.readout_tokens == [1, 2]


def test_generic_dual_encoder_start_layer_per_tower():
    # Last layer of each tower: (I + Ā1)[1] = [1,1] -> [1,0]; (I + Ā3)[token 2] = [4,1] -> [0,1]
    np.testing.assert_allclose(generic_relevancy(dual_encoder(), start_layer=-1).values, [1.0, 0.0, 0.0, 1.0])


def test_generic_dual_encoder_single_tower_readout():
    # readout="image" reads only the image [CLS] row; text columns of that row are 0.
    np.testing.assert_allclose(generic_relevancy(dual_encoder(), readout="image").values, [0.0, 0.0, 0.0, 10.0])
    with pytest.raises(VLIError, match="unknown readout"):
        generic_relevancy(dual_encoder(), readout="answer")


def test_generic_equals_product_of_identity_plus_weighted_attention():
    rng = np.random.default_rng(7)
    n_layers, n_heads, n_tokens, readout = 4, 3, 6, 4
    logits = rng.normal(size=(n_layers, n_heads, n_tokens, n_tokens))
    attention = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    gradient = rng.normal(size=attention.shape)
    captured = Captured(
        attention=attention,
        attention_gradient=gradient,
        layer_kind=["self"] * n_layers,
        modality=["special"] + ["text"] * 2 + ["image"] * 3,
        readout_tokens={"answer": readout},
    )
    product = np.eye(n_tokens)
    for layer in range(n_layers):
        weighted = np.maximum(gradient[layer] * attention[layer], 0).mean(axis=0)
        product = (np.eye(n_tokens) + weighted) @ product
    expected = product[readout].copy()
    expected[readout] = 0
    np.testing.assert_allclose(generic_relevancy(captured).values, expected, rtol=1e-12)


def test_generic_dual_stream_equals_the_block_form_of_the_original_generator():
    # Random LXMERT-like layout; the reference works on (text, image) blocks as Chefer et al.'s generator does,
    # applying both cross updates from the values before each layer and skipping the last layer's image branch.
    rng = np.random.default_rng(11)
    n_text, n_image, n_heads, n_cross = 3, 4, 2, 3
    text, image = list(range(n_text)), list(range(n_text, n_text + n_image))
    streams = {"text": text, "image": image}
    plan = [("text_self", "text", "text")] * 2 + [("image_self", "image", "image")] * 2
    plan += [
        ("cross_text_to_image", "text", "image"),
        ("cross_image_to_text", "image", "text"),
        ("text_self", "text", "text"),
        ("image_self", "image", "image"),
    ] * n_cross
    n_tokens = n_text + n_image
    attention = np.zeros((len(plan), n_heads, n_tokens, n_tokens))
    gradient = np.zeros_like(attention)
    blocks = []
    for layer, (_, query_stream, key_stream) in enumerate(plan):
        queries, keys = streams[query_stream], streams[key_stream]
        logits = rng.normal(size=(n_heads, len(queries), len(keys)))
        block = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        block_gradient = rng.normal(size=block.shape)
        attention[layer][:, np.ix_(queries, keys)[0], np.ix_(queries, keys)[1]] = block
        gradient[layer][:, np.ix_(queries, keys)[0], np.ix_(queries, keys)[1]] = block_gradient
        blocks.append(np.maximum(block * block_gradient, 0).mean(axis=0))

    def residual(relevance):
        shifted = relevance - np.eye(len(relevance))
        return shifted / shifted.sum(axis=1, keepdims=True) + np.eye(len(relevance))

    r_tt, r_ii, r_ti, r_it = np.eye(n_text), np.eye(n_image), np.zeros((n_text, n_image)), np.zeros((n_image, n_text))
    for weighted in blocks[:2]:
        r_tt, r_ti = r_tt + weighted @ r_tt, r_ti + weighted @ r_ti
    for weighted in blocks[2:4]:
        r_ii, r_it = r_ii + weighted @ r_ii, r_it + weighted @ r_it
    for index in range(n_cross):
        text_to_image, image_to_text, text_self, image_self = blocks[4 + 4 * index : 8 + 4 * index]
        add_ti, add_tt = residual(r_tt).T @ text_to_image @ residual(r_ii), text_to_image @ r_it
        if index < n_cross - 1:
            add_it, add_ii = residual(r_ii).T @ image_to_text @ residual(r_tt), image_to_text @ r_ti
            r_it, r_ii = r_it + add_it, r_ii + add_ii
        r_ti, r_tt = r_ti + add_ti, r_tt + add_tt
        r_tt, r_ti = r_tt + text_self @ r_tt, r_ti + text_self @ r_ti
        if index < n_cross - 1:
            r_ii, r_it = r_ii + image_self @ r_ii, r_it + image_self @ r_it
    expected = np.concatenate([r_tt[0], r_ti[0]])
    expected[0] = 0
    captured = Captured(
        attention=attention,
        attention_gradient=gradient,
        layer_kind=[kind for kind, _, _ in plan],
        modality=["special"] + ["text"] * (n_text - 1) + ["image"] * n_image,
        readout_tokens={"answer": 0},
    )
    np.testing.assert_allclose(generic_relevancy(captured).values, expected, rtol=1e-10)


def test_raw_attention_dual_encoder_reads_each_tower_last_layer():
    # Text tower layer 1, row of token 1 = [.25,.75] -> [.25,0]
    # Image tower layer 3, row of token 2 = [.75,.25] -> [0,.25]
    np.testing.assert_allclose(raw_attention(dual_encoder()).values, [0.25, 0.0, 0.0, 0.25])


def test_methods_refuse_layouts_they_do_not_define():
    mixed = single_stream(layer_kind=["self", "cross_text_to_image"])
    with pytest.raises(VLIError, match="not both"):
        rollout(mixed)
    with pytest.raises(VLIError, match="needs 'text' and 'image'"):
        generic_relevancy(single_stream(), readout="text+image")


def test_transformer_attribution_with_the_attention_as_its_relevance_is_the_generic_method():
    # Both use the same update rules (co-attention included) with R^A in place of A in (∇A ⊙ ·)⁺.
    captured = co_attention()
    as_attribution = transformer_attribution(co_attention(attention_relevance=captured.attention))
    np.testing.assert_allclose(as_attribution.values, generic_relevancy(captured).values)
