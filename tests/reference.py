"""Hugging Face transformers as the reference for greedy tokens and logits."""

import torch


class Reference:
    def __init__(self, model_dir, dtype=torch.float32):
        import transformers
        transformers.logging.set_verbosity_error()
        self.model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.eos = set(self.model.generation_config.eos_token_id or [])

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=max_tokens, do_sample=False)
        return out[0, len(prompt):].tolist()

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits after each prefix of `tokens`: row i predicts token i + 1."""
        return self.model(torch.tensor([tokens])).logits[0].float()

    def assert_same_greedy(self, prompt: list[int], expected: list[int], got: list[int], what: str = "") -> None:
        """Tokens must be equal. A difference is accepted only where the reference itself
        has a near-tie (top-2 logit gap below 1e-5) at the first differing position."""
        if got == expected:
            return
        pos = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        if pos < min(len(expected), len(got)):
            row = self.logits(prompt + expected[:pos])[-1]
            top2 = row.topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < 1e-5, (f"{what}: token {pos} differs ({expected[pos]} vs {got[pos]}) and the "
                                f"reference's top-2 gap there is {gap:.3g}, not a near-tie\n"
                                f"expected {expected}\ngot      {got}")
            return
        raise AssertionError(f"{what}: lengths differ\nexpected {expected}\ngot      {got}")
