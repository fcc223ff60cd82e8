"""`python -m train.grounding.convert_official`: the official code's grounding head, converted,
gives the official logits.

The reference is `Segmodule` of Lipurple/Grounded-Diffusion (`ldm/models/seg_module.py`, commit
5680115), written out below line by line: only its imports differ (einops' `rearrange` is
spelled as the `reshape` it is), code its forward never reaches is left out (`make_coord`,
`Embedder`, `resize_fn`), long lines are wrapped, and `noqa` marks the official's own style.
It runs as the official test.py runs it: never in eval mode, under `torch.no_grad()`, at batch
1, on features laid out as its `openaimodel.py` collects them.
"""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import einsum

from actors.features import feature_maps, group_by_resolution
from train.grounding.checkpoint import load_grounding_head
from train.grounding.convert_official import SD1_UNET, main

# ---------------------------------------------------------------- the official seg_module.py


class MLP(nn.Module):
    """Very simple multi-layer perceptron (also called FFN)"""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim])  # noqa: B905
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def _get_clones(module, N):
    return nn.ModuleList([copy.deepcopy(module) for i in range(N)])


def _get_activation_fn(activation):
    """Return an activation function given a string"""
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if activation == "glu":
        return F.glu
    raise RuntimeError(F"activation should be relu/gelu, not {activation}.")


class TransformerDecoder(nn.Module):

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(self, tgt, memory, pos=None, query_pos=None):
        output = tgt

        for layer in self.layers:
            output = layer(output, memory, pos=pos, query_pos=query_pos)

        return output


class TransformerDecoderLayer(nn.Module):

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, no_norm=False,
                 activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=False)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=False)
        # Implementation of Feedforward model
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

        self.norm1 = nn.LayerNorm(d_model) if not no_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(d_model) if not no_norm else nn.Identity()
        self.norm3 = nn.LayerNorm(d_model) if not no_norm else nn.Identity()
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

        self.activation = _get_activation_fn(activation)

    def with_pos_embed(self, tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward(self, tgt, memory, pos=None, query_pos=None):
        tgt2 = self.norm1(tgt)
        q = k = self.with_pos_embed(tgt2, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt2)[0]
        tgt = tgt + self.dropout1(tgt2)
        tgt2 = self.norm2(tgt)
        tgt2 = self.multihead_attn(query=self.with_pos_embed(tgt2, query_pos),
                                   key=self.with_pos_embed(memory, pos),
                                   value=memory)[0]
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.norm3(tgt)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt2))))
        tgt = tgt + self.dropout3(tgt2)
        return tgt


# Projection of x onto y
def proj(x, y):
    return torch.mm(y, x.t()) * y / torch.mm(y, y.t())


# Orthogonalize x wrt list of vectors ys
def gram_schmidt(x, ys):
    for y in ys:
        x = x - proj(x, y)
    return x


def power_iteration(W, u_, update=True, eps=1e-12):
    # Lists holding singular vectors and values
    us, vs, svs = [], [], []
    for i, u in enumerate(u_):
        # Run one step of the power iteration
        with torch.no_grad():
            v = torch.matmul(u, W)
            # Run Gram-Schmidt to subtract components of all other singular vectors
            v = F.normalize(gram_schmidt(v, vs), eps=eps)
            # Add to the list
            vs += [v]
            # Update the other singular vector
            u = torch.matmul(v, W.t())
            # Run Gram-Schmidt to subtract components of all other singular vectors
            u = F.normalize(gram_schmidt(u, us), eps=eps)
            # Add to the list
            us += [u]
            if update:
                u_[i][:] = u
        # Compute this singular value and add it to the list
        svs += [torch.squeeze(torch.matmul(torch.matmul(v, W.t()), u.t()))]
        # svs += [torch.sum(F.linear(u, W.transpose(0, 1)) * v)]
    return svs, us, vs


# Spectral normalization base class
class SN:
    def __init__(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
        # Number of power iterations per step
        self.num_itrs = num_itrs
        # Number of singular values
        self.num_svs = num_svs
        # Transposed?
        self.transpose = transpose
        # Epsilon value for avoiding divide-by-0
        self.eps = eps
        # Register a singular vector for each sv
        for i in range(self.num_svs):
            self.register_buffer('u%d' % i, torch.randn(1, num_outputs))  # noqa: UP031
            self.register_buffer('sv%d' % i, torch.ones(1))  # noqa: UP031

    # Singular vectors (u side)
    @property
    def u(self):
        return [getattr(self, 'u%d' % i) for i in range(self.num_svs)]  # noqa: UP031

    # Singular values;
    # note that these buffers are just for logging and are not used in training.
    @property
    def sv(self):
        return [getattr(self, 'sv%d' % i) for i in range(self.num_svs)]  # noqa: UP031

    # Compute the spectrally-normalized weight
    def W_(self):
        W_mat = self.weight.view(self.weight.size(0), -1)
        if self.transpose:
            W_mat = W_mat.t()
        # Apply num_itrs power iterations
        for _ in range(self.num_itrs):
            svs, us, vs = power_iteration(W_mat, self.u, update=self.training, eps=self.eps)
        # Update the svs
        if self.training:
            # Make sure to do this in a no_grad() context or you'll get memory leaks!
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    self.sv[i][:] = sv
        return self.weight / svs[0]


# Linear layer with spectral norm
class SNLinear(nn.Linear, SN):
    def __init__(self, in_features, out_features, bias=True,
                 num_svs=1, num_itrs=1, eps=1e-12):
        nn.Linear.__init__(self, in_features, out_features, bias)
        SN.__init__(self, num_svs, num_itrs, out_features, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


# 2D Conv layer with spectral norm
class SNConv2d(nn.Conv2d, SN):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1,
                 padding=0, dilation=1, groups=1, bias=True,
                 num_svs=1, num_itrs=1, eps=1e-12):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride,
                           padding, dilation, groups, bias)
        SN.__init__(self, num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


class SegBlock(nn.Module):
    def __init__(self, in_channels, out_channels, con_channels,
                 which_conv=nn.Conv2d, which_linear=None, activation=None,
                 upsample=None):
        super(SegBlock, self).__init__()  # noqa: UP008

        self.in_channels, self.out_channels = in_channels, out_channels
        self.which_conv, self.which_linear = which_conv, which_linear
        self.activation = activation
        self.upsample = upsample

        self.conv1 = self.which_conv(self.in_channels, self.out_channels)
        self.conv2 = self.which_conv(self.out_channels, self.out_channels)
        self.learnable_sc = in_channels != out_channels or upsample
        if self.learnable_sc:
            self.conv_sc = self.which_conv(in_channels, out_channels,
                                           kernel_size=1, padding=0)

        self.register_buffer('stored_mean1', torch.zeros(in_channels))
        self.register_buffer('stored_var1', torch.ones(in_channels))
        self.register_buffer('stored_mean2', torch.zeros(out_channels))
        self.register_buffer('stored_var2', torch.ones(out_channels))

        self.upsample = upsample

    def forward(self, x, y=None):
        x = F.batch_norm(x, self.stored_mean1, self.stored_var1, None, None,
                         self.training, 0.1, 1e-4)
        h = self.activation(x)
        if self.upsample:
            h = self.upsample(h)
            x = self.upsample(x)
        h = self.conv1(h)
        h = F.batch_norm(h, self.stored_mean2, self.stored_var2, None, None,
                         self.training, 0.1, 1e-4)

        h = self.activation(h)
        h = self.conv2(h)
        if self.learnable_sc:
            x = self.conv_sc(x)
        return h + x


class Segmodule(nn.Module):

    def __init__(self,
                 embedding_dim=512,
                 num_heads=8,
                 num_layers=3,
                 hidden_dim=2048,
                 dropout_rate=0):
        super().__init__()

        low_feature_channel = 16
        mid_feature_channel = 32
        high_feature_channel = 64
        highest_feature_channel = 128

        self.low_feature_conv = nn.Sequential(
            nn.Conv2d(1280 * 6 * 2, low_feature_channel, kernel_size=1, bias=False),
        )
        self.mid_feature_conv = nn.Sequential(
            nn.Conv2d((1280 * 5 + 640) * 2, mid_feature_channel, kernel_size=1, bias=False),
        )
        self.mid_feature_mix_conv = SegBlock(
            in_channels=low_feature_channel + mid_feature_channel,
            out_channels=low_feature_channel + mid_feature_channel,
            con_channels=128,
            which_conv=functools.partial(SNConv2d,
                                         kernel_size=3, padding=1,
                                         num_svs=1, num_itrs=1,
                                         eps=1e-04),
            which_linear=functools.partial(SNLinear,
                                           num_svs=1, num_itrs=1,
                                           eps=1e-04),
            activation=nn.ReLU(inplace=True),
            upsample=False,
        )
        self.high_feature_conv = nn.Sequential(
            nn.Conv2d((1280 + 640 * 4 + 320) * 2, high_feature_channel, kernel_size=1,
                      bias=False),
        )
        self.high_feature_mix_conv = SegBlock(
            in_channels=(low_feature_channel + mid_feature_channel
                         + high_feature_channel),
            out_channels=(low_feature_channel + mid_feature_channel
                         + high_feature_channel),
            con_channels=128,
            which_conv=functools.partial(SNConv2d,
                                         kernel_size=3, padding=1,
                                         num_svs=1, num_itrs=1,
                                         eps=1e-04),
            which_linear=functools.partial(SNLinear,
                                           num_svs=1, num_itrs=1,
                                           eps=1e-04),
            activation=nn.ReLU(inplace=True),
            upsample=False,
        )
        self.highest_feature_conv = nn.Sequential(
            nn.Conv2d((640 + 320 * 6) * 2, highest_feature_channel, kernel_size=1, bias=False),
        )
        self.highest_feature_mix_conv = SegBlock(
            in_channels=(low_feature_channel + mid_feature_channel
                         + high_feature_channel + highest_feature_channel),
            out_channels=(low_feature_channel + mid_feature_channel
                         + high_feature_channel + highest_feature_channel),
            con_channels=128,
            which_conv=functools.partial(SNConv2d,
                                         kernel_size=3, padding=1,
                                         num_svs=1, num_itrs=1,
                                         eps=1e-04),
            which_linear=functools.partial(SNLinear,
                                           num_svs=1, num_itrs=1,
                                           eps=1e-04),
            activation=nn.ReLU(inplace=True),
            upsample=False,
        )

        feature_dim = (low_feature_channel + mid_feature_channel + high_feature_channel
                       + highest_feature_channel)
        query_dim = feature_dim * 16
        decoder_layer = TransformerDecoderLayer(embedding_dim, num_heads, hidden_dim,
                                                dropout_rate)
        self.transfromer_decoder = TransformerDecoder(decoder_layer, num_layers)
        self.mlp = MLP(embedding_dim, embedding_dim, feature_dim, 3)
        context_dim = 768

        self.to_k = nn.Linear(query_dim, embedding_dim, bias=False)
        self.to_q = nn.Linear(context_dim, embedding_dim, bias=False)

    def forward(self, diffusion_feature, text_embedding):

        image_feature = self._prepare_features(diffusion_feature)

        final_image_feature = F.interpolate(image_feature, size=512, mode='bilinear',
                                            align_corners=False)
        b = final_image_feature.size()[0]

        patch_size = 4
        patch_number = int(image_feature.size()[2] / patch_size)  # noqa: F841

        image_feature = torch.nn.functional.unfold(image_feature, patch_size,
                                                   stride=patch_size).transpose(1, 2).contiguous()

        # rearrange(x, 'b n d -> (b n) d  ')
        image_feature = image_feature.reshape(-1, image_feature.shape[-1])
        text_embedding = text_embedding.reshape(-1, text_embedding.shape[-1])

        q = self.to_q(text_embedding)
        k = self.to_k(image_feature)

        output_query = self.transfromer_decoder(q, k, None)

        # rearrange(output_query, '(b n) d -> b n d', b=b)
        output_query = output_query.reshape(b, -1, output_query.shape[-1])

        mask_embedding = self.mlp(output_query)
        seg_result = einsum('b d h w, b n d -> b n h w', final_image_feature, mask_embedding)

        return seg_result

    def _prepare_features(self, features, upsample='bilinear'):
        self.low_feature_size = 16
        self.mid_feature_size = 32
        self.high_feature_size = 64

        low_features = [
            F.interpolate(i, size=self.low_feature_size, mode=upsample, align_corners=False)
            for i in features["low"]
        ]
        low_features = torch.cat(low_features, dim=1)

        mid_features = [
            F.interpolate(i, size=self.mid_feature_size, mode=upsample, align_corners=False)
            for i in features["mid"]
        ]
        mid_features = torch.cat(mid_features, dim=1)

        high_features = [
            F.interpolate(i, size=self.high_feature_size, mode=upsample, align_corners=False)
            for i in features["high"]
        ]
        high_features = torch.cat(high_features, dim=1)
        highest_features = torch.cat(features["highest"], dim=1)
        features_dict = {
            'low': low_features,
            'mid': mid_features,
            'high': high_features,
            'highest': highest_features,
        }

        low_feat = self.low_feature_conv(features_dict['low'])
        low_feat = F.interpolate(low_feat, size=self.mid_feature_size, mode='bilinear',
                                 align_corners=False)

        mid_feat = self.mid_feature_conv(features_dict['mid'])
        mid_feat = torch.cat([low_feat, mid_feat], dim=1)
        mid_feat = self.mid_feature_mix_conv(mid_feat, y=None)
        mid_feat = F.interpolate(mid_feat, size=self.high_feature_size, mode='bilinear',
                                 align_corners=False)

        high_feat = self.high_feature_conv(features_dict['high'])
        high_feat = torch.cat([mid_feat, high_feat], dim=1)
        high_feat = self.high_feature_mix_conv(high_feat, y=None)

        highest_feat = self.highest_feature_conv(features_dict['highest'])
        highest_feat = torch.cat([high_feat, highest_feat], dim=1)
        highest_feat = self.highest_feature_mix_conv(highest_feat, y=None)

        return highest_feat


# ------------------------------------------------------ the official openaimodel.py's features

# The ldm UNet's (configs/stable-diffusion/v1-inference.yaml) block outputs in forward order,
# (channels, size at 512x512): input blocks 0-11 (conv_in; res+attn, res+attn, downsample per
# level; the last level without attention or downsampler), the middle block, output blocks
# 0-11 (three per level, the third of each but the last with its upsampler)
LDM_BLOCKS = ([(320, 64)] * 3 + [(320, 32)] + [(640, 32)] * 2 + [(640, 16)] + [(1280, 16)] * 2
              + [(1280, 8)] * 3
              + [(1280, 8)]
              + [(1280, 8)] * 2 + [(1280, 16)] * 3 + [(1280, 32)] + [(640, 32)] * 2
              + [(640, 64)] + [(320, 64)] * 3)
GROUP_OF_SIZE = {8: "low", 16: "mid", 32: "high", 64: "highest"}


def block_outputs(seed: int = 0) -> list[torch.Tensor]:
    """Random outputs of the 25 blocks for one image's CFG batch: (2, C, s, s), the
    unconditional half first (ddim.py: `c_in = torch.cat([unconditional_conditioning, c])`)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=g) for c, s in LDM_BLOCKS]


def official_features(outputs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """`all_feature_dic` as openaimodel.py's forward fills it when `timesteps[0] == 1`."""
    all_feature_dic = {"low": [], "mid": [], "high": [], "highest": []}
    for h in outputs:
        reshape_h = h.reshape(int(h.size()[0] / 2), int(h.size()[1] * 2), h.size()[2],
                              h.size()[3])
        all_feature_dic[GROUP_OF_SIZE[h.size()[2]]].append(reshape_h)
    return all_feature_dic


def our_features(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same maps as `actors.features.FeatureExtractor` lays them out: grouped by resolution,
    coarse to fine, each group's unconditional maps, then its conditional ones."""
    groups = group_by_resolution(outputs, feature_maps(SD1_UNET))
    return [torch.cat([g[:1], g[1:]], dim=1) for g in groups]


# --------------------------------------------------------------------------------- the tests


def test_our_sd1_maps_are_the_ldm_blocks():
    assert [(m.channels, 64 >> m.level) for m in feature_maps(SD1_UNET)] == LDM_BLOCKS


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A randomly initialised official Segmodule, saved as its train.py saves it."""
    torch.manual_seed(0)
    module = Segmodule()
    path = str(tmp_path_factory.mktemp("official") / "checkpoint_latest.pth")
    torch.save(module.state_dict(), path)
    return module, path


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    """`python -m train.grounding.convert_official CKPT OUT --model sd15-random`'s OUT."""
    out = str(tmp_path_factory.mktemp("converted") / "head")
    main([official[1], out, "--model", "sd15-random"])
    return out


def test_a_converted_official_head_gives_the_official_logits(official, converted):
    head, info = load_grounding_head(converted)  # as `factory label` and Protocol I load it
    assert (info["split"], info["fold"], info["model"]) == ("pascal", "1", "sd15-random")
    assert len(info["seen"]) == 15 and "tvmonitor" not in info["seen"]
    outputs = block_outputs()
    text = torch.randn(1, 2, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(official[0])(official_features(outputs), text)  # train mode, as
        ours = head(our_features(outputs), text, size=(512, 512))          # test.py runs it
    scale = float(ref.abs().max())  # ~7: logits of a random head
    assert ref.shape == ours.shape == (1, 2, 512, 512) and scale > 1
    assert (ours - ref).abs().max() <= 1e-5 * scale  # measured: 9.5e-6


def test_factory_label_accepts_the_converted_head(converted, tmp_path):
    """`factory label --checkpoint OUT`'s checks and plan (nothing is written or run)."""
    from factory.identity import prepare_label
    from factory.options import LabelOptions

    plan, store = prepare_label(LabelOptions(out=str(tmp_path / "seg"), checkpoint=converted,
                                             n=4))
    assert (plan.split.name, plan.split.fold) == ("pascal", "1")
    assert store.manifest["run"]["model"] == "sd15-random"
    assert not (tmp_path / "seg").exists()


def test_each_reduced_group_is_the_official_1x1_conv_of_the_official_layout(official,
                                                                           converted):
    """The converted 1x1 convs read our layout as the official ones read theirs (without the
    permutation they would read other channels)."""
    head, _ = load_grounding_head(converted)
    outputs = block_outputs(seed=2)
    theirs, ours = official_features(outputs), our_features(outputs)
    with torch.no_grad():
        for i, group in enumerate(("low", "mid", "high", "highest")):
            conv = getattr(official[0], f"{group}_feature_conv")
            torch.testing.assert_close(head.visual.reduce[i](ours[i]),
                                       conv(torch.cat(theirs[group], dim=1)))


def test_the_converted_head_goes_where_its_options_say(official, tmp_path, run_cli):
    _, path = official
    out = str(tmp_path / "head")
    code, _, err = run_cli(main, [path, out, "--split", "coco", "--fold", "2"])
    assert code == 0, err
    head, info = load_grounding_head(out)
    assert (info["split"], info["fold"], info["model"]) == (
        "coco", "2", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert len(info["seen"]) == 65 and info["converted_from"] == path
    assert not head.training


def write_truncated(official, folder):
    path = folder / "truncated.pth"
    data = open(official[1], "rb").read()
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def write_maskformer(official, folder):
    from train.maskformer.model import build_maskformer

    path = folder / "maskformer.pth"
    torch.save(build_maskformer("tiny", 21).state_dict(), path)
    return str(path)


def write_own_head(official, folder):
    from train.grounding.model import build_grounding_head

    path = folder / "head.pt"
    torch.save(build_grounding_head("paper").state_dict(), path)
    return str(path)


def write_train_state(official, folder):
    path = folder / "train.pt"
    torch.save({"head": {}, "opt": {"state": {}}, "step": 3}, path)
    return str(path)


def write_other_widths(official, folder):
    state = torch.load(official[1], weights_only=True)
    state["low_feature_conv.0.weight"] = torch.zeros(16, 100, 1, 1)
    path = folder / "other.pth"
    torch.save(state, path)
    return str(path)


def write_extra_key(official, folder):
    state = torch.load(official[1], weights_only=True)
    state["mid_feature_mix_conv.conv_sc.weight"] = torch.zeros(48, 48, 1, 1)
    path = folder / "extra.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("write, message", [
    (lambda official, folder: str(folder), "is a folder: give the official Segmodule's .pth"),
    (write_truncated, "cannot read"),
    (write_maskformer, "missing 90 of its 90 keys: low_feature_conv.0.weight"),
    (write_own_head, "this project's head: use it as it is"),
    (write_train_state, "not a state dict"),
    (write_other_widths, "low_feature_conv.0.weight is (16, 100, 1, 1), not the official "
                         "Segmodule's (16, 15360, 1, 1)"),
    (write_extra_key, "unexpected mid_feature_mix_conv.conv_sc.weight"),
])
def test_what_is_not_an_official_checkpoint_is_refused_in_one_line(official, tmp_path, run_cli,
                                                                   write, message):
    ckpt = write(official, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(main, [ckpt, str(out)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny"], "the official head reads SD 1.x's features"),
    (["--fold", "7"], "unknown fold '7'"),
])
def test_bad_options_are_refused_in_one_line(official, tmp_path, run_cli, args, message):
    code, _, err = run_cli(main, [official[1], str(tmp_path / "out"), *args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_existing_output_is_never_overwritten(official, tmp_path, run_cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "head.pt").write_bytes(b"mine")
    code, _, err = run_cli(main, [official[1], str(tmp_path / "out")])
    assert code == 2 and "is not an empty folder" in err
    assert (tmp_path / "out" / "head.pt").read_bytes() == b"mine"
