"""The memory of Video-XL: per layer, the keys and values that survive compression.

Keep rule: text rows are kept as they are; of a visual window only the VST rows are kept, with their keys rotated
at the position they take in memory. Raw visual keys and values are never stored. Keys are stored after RoPE, and
a kept row's position equals the number of valid rows kept before it, so stored keys never need rotating again.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BeaconCache(Cache):
    """A [`Cache`] holding the kept (compressed) memory of every layer.

    Per layer it stores keys and values `[batch, kv_heads, kept, head_dim]`. Beside them it holds:

    - `key_mask` `[batch, kept]` (long): 1 for a kept row, 0 for padding that must never be attended to.
    - `seen_tokens` (int): how many columns of `input_ids` the memory has absorbed, so that `generate` can tell
      the new tokens from the ones already encoded (the kept length is smaller once windows are compressed).

    `get_seq_length()` is the number of kept positions: prefix + VSTs + text.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers)])
        self.key_mask: torch.Tensor | None = None
        self.seen_tokens = 0

    def memory(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The kept keys and values of one layer, or (None, None) while it is empty."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return None, None
        return layer.keys, layer.values

    def keep(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append the rows of one step that stay in memory. `keys`/`values`: `[batch, kv_heads, kept_rows, head_dim]`."""
        self.layers[layer_idx].update(keys, values)

    def keep_mask(self, step_mask: torch.Tensor) -> None:
        """Record which of the rows appended in this step are valid. `step_mask`: `[batch, kept_rows]`."""
        step_mask = step_mask.to(torch.long)
        self.key_mask = step_mask if self.key_mask is None else torch.cat([self.key_mask, step_mask], dim=1)

    def valid_length(self) -> torch.Tensor | None:
        """Number of valid kept rows per sample `[batch]`: the position the next token takes."""
        return None if self.key_mask is None else self.key_mask.sum(dim=1)

    @property
    def is_croppable(self) -> bool:
        # A compressed window cannot be un-compressed, so assisted decoding's rollback is not possible.
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[indices]


__all__ = ["BeaconCache"]
