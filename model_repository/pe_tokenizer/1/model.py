"""pe_tokenizer: passage texts -> encoder input ids and attention mask (truncated to 512)."""
import triton_python_backend_utils as pb_utils

from pe_rank.runtime.model import encoder_inputs
from pe_rank.core.errors import InvalidRequest
from pe_rank.triton_backend.config_check import check_config
from pe_rank.triton_backend.utils import input_array, model_dir, respond_each


class TritonPythonModel:
    def initialize(self, args):
        check_config(args, "pe_tokenizer")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir(args) / "tokenizer"))

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._tokenize)

    def _tokenize(self, request):
        raw = input_array(pb_utils, request, "TEXT").reshape(-1)
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
        if not texts:
            raise InvalidRequest("TEXT", "is empty")
        enc = encoder_inputs(self.tokenizer, texts)
        return [pb_utils.Tensor("INPUT_IDS", enc["input_ids"]), pb_utils.Tensor("ATTENTION_MASK", enc["attention_mask"])]

    def finalize(self):
        self.tokenizer = None
