"""Parts of the integer-weight passes quantize-dynamic and quantize-weights: which MatMul/Gemm sites qualify
(``sites``), blockwise quantization (``blockwise``), AWQ's channel scaling (``awq``), the inputs' second moments
(``observe``) and the nodes written (``emit``). Imports nothing (see passes/__init__)."""
