#!/bin/sh
# Fuzzes the job-file parser and validator with cargo fuzz (libFuzzer) for SECONDS (default 300).
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
set -eu
cd "$(dirname "$0")/../fuzz"
seconds=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
mkdir -p corpus/job_file
cp seeds/job_file/* corpus/job_file/
RUSTC_BOOTSTRAP=1 cargo fuzz run job_file corpus/job_file -- -max_total_time="$seconds" -max_len=4096 -timeout=10
