//! safetensors I/O: memory-mapped loading (single file or sharded with an index) and saving in
//! the HF layout with write-then-rename.
