"""The only code that talks to llama.cpp: the binding (llama-cpp-python's ctypes functions) and
ggml's own libraries.

Everything above this package speaks ondevice's own types, so a binding upgrade touches these
files only. Importing this package loads nothing: the binding (and with it libllama, libggml
and the OpenMP runtime) is loaded on first use by `binding.llama()`, so `ondevice fit`, `info`
and the converter never pay for it.

  binding.py     loads the binding once, initialises llama.cpp, facts about the build
  log.py         llama.cpp's log routed to Python logging, and every parser of its log lines
  engine.py      a loaded model with its context: tokenize, decode, KV cache, sampler chains
  devices.py     ggml's device registry (backends compiled in, GPUs and their memory)
  quantizer.py   llama.cpp's file quantizer and its list of file types (for the worker process)
  ggml_quants.py ggml's row quantizer for the converter (libggml-base only, no llama.cpp)
  probe_worker.py the child process of the first-load check (ondevice.probe)
"""
