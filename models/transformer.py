"""The DAB-DETR encoder/decoder as CORA configures it (SPEC §3.7–3.9, §3.12, §9).

Encoder: post-norm layers whose sine positions are rescaled by a shared MLP of the current
content, FFNs with a learnable PReLU, no final norm. Decoder: 4-d anchor queries, conditional
cross-attention whose per-head query/key are [content | position] concatenations, width/height
modulated positional queries, and per-layer box refinement by the detector's box heads (assigned
to `decoder.bbox_embed` after construction). Module names reproduce the original's state-dict keys.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.mlp import MLP
from util.box_ops import inverse_sigmoid

# The decoder's own reference update uses inverse_sigmoid with eps 1e-3 (the detection heads use 1e-5).
DECODER_REF_EPS = 1e-3


def gen_sineembed_for_position(pos: torch.Tensor, num_pos_feats: int = 128) -> torch.Tensor:
    """Sine embedding of anchor boxes.

    pos `[Q,B,4]` (cx, cy, w, h in [0,1]) -> `[Q,B,4*num_pos_feats]` in the order (y, x, w, h); for
    `[Q,B,2]` points (cx, cy) -> (y, x). Each coordinate v gives channels k = 0..num_pos_feats-1 of
    v*2π / 10000^(2⌊k/2⌋/num_pos_feats), sine on even k and cosine on odd k.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    scaled = pos[..., None] * (2 * math.pi) / dim_t  # [Q,B,C,F]
    emb = torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), dim=-1).flatten(-2)
    # y before x, as the original (DETR's image PE is also ordered y, x); slices, not an index list, which
    # would be a host-to-device copy per call on a GPU
    return torch.cat([emb[..., 1:2, :], emb[..., 0:1, :], emb[..., 2:, :]], dim=-2).flatten(-2)


class MultiheadAttentionNoInProj(nn.Module):
    """Multi-head attention on inputs that are already projected (DAB-DETR's decoder attention).

    Only `out_proj` has weights. Scores use head dim embed_dim/num_heads (scaled by its inverse square
    root); values are split into vdim/num_heads per head, so queries/keys and values may differ in width.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, vdim: int, dropout: float):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.vdim = vdim
        self.dropout = dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query `[L,B,embed_dim]`, key `[S,B,embed_dim]`, value `[S,B,vdim]`, key_padding_mask `[B,S]`
        (True = ignore that key) -> `[L,B,vdim]`."""
        h = self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [N,B,C] -> [B,h,N,C/h]
            n, b, c = x.shape
            return x.reshape(n, b, h, c // h).permute(1, 2, 0, 3)

        # scaled_dot_product_attention's boolean mask marks the keys that take part
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, length, _ = out.shape
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, b, self.vdim))


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention + PReLU FFN; positions are added to queries and keys only."""

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, src: torch.Tensor, key_padding_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src, pos `[hw,B,d]`, key_padding_mask `[B,hw]` (True = padding) -> `[hw,B,d]`."""
        qk = src + pos
        attn = self.self_attn(qk, qk, value=src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, *, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        # one MLP shared by all layers turns the current content into per-channel PE scales
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: torch.Tensor, key_padding_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src, pos `[hw,B,d]`, key_padding_mask `[B,hw]` -> memory `[hw,B,d]` (no final norm)."""
        out = src
        for layer in self.layers:
            out = layer(out, key_padding_mask, pos * self.query_scale(out))
        return out


class TransformerDecoderLayer(nn.Module):
    """DAB-DETR decoder layer: self-attention, conditional cross-attention, PReLU FFN, all post-norm.

    All q/k/v projections are explicit Linear layers, so the attentions have no in-projections. The
    cross-attention concatenates, per head, the content part with the positional part (sine embedding
    of the anchor for the query, image PE for the key), giving 2*d-wide queries/keys.
    """

    def __init__(self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.nhead = nhead
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = MultiheadAttentionNoInProj(d_model, nhead, vdim=d_model, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        # The decoder removes this from every layer but the first (keep_query_pos=False).
        self.ca_qpos_proj: nn.Linear | None = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = MultiheadAttentionNoInProj(d_model * 2, nhead, vdim=d_model, dropout=dropout)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor,
                pos: torch.Tensor, query_pos: torch.Tensor, query_sine_embed: torch.Tensor) -> torch.Tensor:
        """tgt `[Q,B,d]` content, memory/pos `[hw,B,d]`, memory_key_padding_mask `[B,hw]` (True = padding),
        query_pos `[Q,B,d]` (ref_point_head of the anchor's sine embedding), query_sine_embed `[Q,B,d]`
        (scaled and HW-modulated (y, x) sine embedding) -> `[Q,B,d]`."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt))))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            # first layer only: positions also enter the content parts
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = self._concat_per_head(q, q_sine)
        k = self._concat_per_head(k, k_pos)
        attn = self.cross_attn(q, k, v, key_padding_mask=memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))

        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))

    def _concat_per_head(self, content: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """`[N,B,d]` twice -> `[N,B,2d]` laid out as head 0 [content | position], head 1 [...], ..."""
        n, b, d = content.shape
        parts = (content.view(n, b, self.nhead, d // self.nhead), position.view(n, b, self.nhead, d // self.nhead))
        return torch.cat(parts, dim=3).view(n, b, 2 * d)


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, *, num_layers: int, d_model: int, query_dim: int):
        super().__init__()
        # modulated HW attention divides by the anchor's width and height
        assert query_dim == 4, "CORA's decoder refines 4-d anchors (cx, cy, w, h)"
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        for later in self.layers[1:]:
            later.ca_qpos_proj = None
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(query_dim // 2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)
        self.d_model = d_model
        self.query_dim = query_dim
        # The detector's per-layer box heads (ModuleList of MLP(d,d,4,3)); assigned by the detector so
        # that they are shared with its outputs (state-dict keys `transformer.decoder.bbox_embed.*`).
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor,
                pos: torch.Tensor, refpoints_unsigmoid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tgt `[Q,B,d]`, memory/pos `[hw,B,d]`, memory_key_padding_mask `[B,hw]`, refpoints_unsigmoid
        `[Q,B,4]` (logits of cxcywh anchors).

        Returns hs `[L,B,Q,d]` (each layer's output after the final norm) and references `[L,B,Q,4]`
        (cxcywh in [0,1]: the anchors, then the refined boxes of layers 0..L-2; kept with gradient).
        """
        if self.bbox_embed is None:
            raise RuntimeError("decoder.bbox_embed must be assigned (the detector's box heads) before forward")
        d = self.d_model
        out = tgt
        ref = refpoints_unsigmoid.sigmoid()
        references = [ref]
        hs = []
        for i, layer in enumerate(self.layers):
            sine = gen_sineembed_for_position(ref, d // 2)  # [Q,B,2d]: (y, x, w, h)
            query_pos = self.ref_point_head(sine)
            # the first layer has no content yet to condition the position on
            scale = 1 if i == 0 else self.query_scale(out)
            sine = sine[..., :d] * scale  # (y, x) part only
            ref_hw = self.ref_anchor_head(out).sigmoid()  # (w_ref, h_ref)
            # modulated HW attention: y channels by h_ref / h, x channels by w_ref / w
            sine = torch.cat((sine[..., : d // 2] * (ref_hw[..., 1] / ref[..., 3])[..., None],
                              sine[..., d // 2:] * (ref_hw[..., 0] / ref[..., 2])[..., None]), dim=-1)
            out = layer(out, memory, memory_key_padding_mask, pos, query_pos, sine)

            # refine on the un-normalised output (the heads later use the normalised hs)
            delta = self.bbox_embed[i](out)
            new_ref = (delta[..., : self.query_dim] + inverse_sigmoid(ref, eps=DECODER_REF_EPS)).sigmoid()
            if i != len(self.layers) - 1:
                references.append(new_ref)
            ref = new_ref.detach()
            hs.append(self.norm(out))
        return torch.stack(hs).transpose(1, 2), torch.stack(references).transpose(1, 2)


class Transformer(nn.Module):
    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 query_dim: int = 4):
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                            dropout=dropout)
        self.encoder = TransformerEncoder(enc_layer, num_layers=num_encoder_layers, d_model=d_model)
        dec_layer = TransformerDecoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                            dropout=dropout)
        self.decoder = TransformerDecoder(dec_layer, num_layers=num_decoder_layers, d_model=d_model,
                                          query_dim=query_dim)
        self.d_model = d_model
        self.nhead = nhead
        self.num_decoder_layers = num_decoder_layers
        # before bbox_embed is attached, so the box heads keep their own initialisation
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, mask: torch.Tensor, refpoints_unsigmoid: torch.Tensor,
                pos_embed: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """src `[B,d,h,w]` (input_proj of layer3), mask `[B,h,w]` (True = padding), refpoints_unsigmoid
        `[Q,B',4]` (reordered anchors, logits of cxcywh), pos_embed `[B,d,h,w]` (sine PE of layer3),
        tgt `[Q,B',d]` content queries. B' is B, or 2B for split_class: the encoder runs on the B images
        once and its memory, mask and PE are repeated [b0..bB-1, b0..bB-1] to face both query halves.

        Returns hs `[L,B',Q,d]` (normalised decoder outputs), references `[L,B',Q,4]` (cxcywh in [0,1];
        references[0] = sigmoid(refpoints), references[l] = boxes refined by layer l-1, with gradient),
        memory `[h*w,B,d]`.
        """
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos)

        dec_memory = memory
        if tgt.shape[1] != bs:
            assert tgt.shape[1] == 2 * bs, f"query batch {tgt.shape[1]} is neither {bs} nor its split double"
            dec_memory, mask, pos = memory.repeat(1, 2, 1), mask.repeat(2, 1), pos.repeat(1, 2, 1)
        hs, references = self.decoder(tgt, dec_memory, mask, pos, refpoints_unsigmoid)
        return hs, references, memory


def build_transformer(cfg: ModelConfig) -> Transformer:
    return Transformer(d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
                       num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
                       dropout=cfg.dropout)
