"""The native kernels (`models/kernels.c`), by responsibility:

- `library`: building the C library on this machine, loading it (one table of ctypes prototypes),
  `enabled()` and `disabled()`;
- `formats`: GGUF's block formats (`FORMATS`, keyed by GGUF type number), quantizing, the tiled
  order, dequantizing;
- `ops`: the native products (block matrix products, one-token attention, a fused llama block);
- `threads`: the thread policy (`own_threads`, `in_passing_thread`).

The modules swapped into a model to use them are in `models/native.py`.
"""
