#!/bin/bash -eu
# Build every Atheris fuzz target of kvmspec the OSS-Fuzz way: one executable per
# fuzz/fuzz_<name>.py (compile_python_fuzzer packages it with its dependencies), its seed
# corpus as <target>_seed_corpus.zip from corpus/seeds/<name>/, and its libFuzzer options
# (the input size the project uses) as <target>.options. SRC and OUT come from the builder.

pip3 install .

# The input sizes of `make fuzz*` and `kvmspec campaign`; a target not listed gets libFuzzer's
# default.
declare -A MAX_LEN=([memslots]=1024 [generic]=512 [x86]=256 [ppc]=256 [arm64]=256)

for fuzzer in fuzz/fuzz_*.py; do
  target=$(basename -s .py "$fuzzer")
  name=${target#fuzz_}
  compile_python_fuzzer "$fuzzer"
  if [ -d "corpus/seeds/$name" ]; then
    (cd "corpus/seeds/$name" && zip -q -j "$OUT/${target}_seed_corpus.zip" ./*)
  fi
  if [ -n "${MAX_LEN[$name]:-}" ]; then
    printf '[libfuzzer]\nmax_len = %s\n' "${MAX_LEN[$name]}" > "$OUT/$target.options"
  fi
done
