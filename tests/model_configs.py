"""Small V4 configs with different layer schedules and widths, used across model tests.

Every config keeps the real window (128) and rates (4, 128). Indexers have >= 16 heads: with
fewer, a query's top-k boundary can fall among entries whose score is exactly 0 (every head's
ReLU zero), and then which of those tied entries is picked is arbitrary in transformers'
torch.topk, so the two implementations could legitimately differ.
"""

from workers.config import CSA, HCA, SWA, ModelConfig, preset

TINY = preset("tiny")

# Starts with compressed layers, wider heads, 3 routed experts per token, one hash layer.
WIDE = ModelConfig(
    name="wide", vocab_size=258, hidden_size=96, num_hidden_layers=6, num_attention_heads=8, head_dim=192,
    q_lora_rank=48, o_groups=4, o_lora_rank=24, compress_ratios=(CSA, HCA, SWA, HCA, CSA, CSA),
    index_n_heads=16, index_head_dim=128, index_topk=24, n_routed_experts=6, num_experts_per_tok=3,
    moe_intermediate_size=40, num_hash_layers=1,
)

# Pro-like schedule (HCA first, no SWA-only layer), two heads of 256, three hash layers.
PROLIKE = ModelConfig(
    name="prolike", vocab_size=258, hidden_size=48, num_hidden_layers=4, num_attention_heads=2, head_dim=256,
    q_lora_rank=24, o_groups=1, o_lora_rank=16, compress_ratios=(HCA, HCA, CSA, HCA),
    index_n_heads=32, index_head_dim=64, index_topk=8, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=24, num_hash_layers=3,
)

ALL = [TINY, WIDE, PROLIKE]
