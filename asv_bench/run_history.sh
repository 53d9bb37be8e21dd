#!/usr/bin/env bash
# Benchmark the last N commits of main (default 5) with every suite, then publish the site.
#
#   asv_bench/run_history.sh [N] [extra `asv run` arguments...]
#
# Each commit is built and installed in its own virtualenv under asv_bench/env/ (the
# first time: torch==2.13.0, libcirkit, scikit-learn, numpy, scipy; see asv.conf.json),
# then measured with the benchmark files of the *current* checkout (asv always does
# that); benchmarks whose API a commit lacks show as n/a for it. Results go to
# asv_bench/results/<machine>/ (committed: the project's history), the site to
# asv_bench/html/ (git-ignored; `asv preview` serves it).
#
# Commits that already have results for this machine are skipped (--skip-existing-commits),
# so a later run measures only the new ones; delete a commit's result file under
# results/<machine>/ to measure it again. Environment:
#   ASV_MACHINE   machine name stored with the results (default ci-2core); the entry in
#                 ~/.asv-machine.json is written without questions, asv detecting the rest
#   ASV_BRANCH    branch to walk (default main)
#   ASV           how to start asv (default: asv; e.g. ASV="python -m asv")
#   STRUCTLAYERS_BENCH_THREADS, STRUCTLAYERS_CACHE  as for any asv run (README.md)
# Exits with asv run's status (non-zero if a benchmark failed), after publishing anyway.
set -euo pipefail

n="${1:-5}"
case "$n" in
    '' | *[!0-9]* | 0) echo "usage: $0 [N >= 1] [asv run arguments...]" >&2; exit 2 ;;
esac
shift $(( $# > 0 ? 1 : 0 ))
machine="${ASV_MACHINE:-ci-2core}"
branch="${ASV_BRANCH:-main}"
read -r -a asv <<< "${ASV:-asv}"

cd "$(dirname "$0")"  # asv reads asv.conf.json from here

hashes="$(mktemp)"
trap 'rm -f "$hashes"' EXIT
git rev-list --first-parent --max-count="$n" "$branch" -- > "$hashes"
echo "benchmarking $(wc -l < "$hashes") commit(s) of $branch as machine $machine"

"${asv[@]}" machine --yes --machine "$machine"
status=0
"${asv[@]}" run --machine "$machine" --skip-existing-commits "$@" "HASHFILE:$hashes" || status=$?
"${asv[@]}" publish
echo "results: asv_bench/results/$machine/ (commit them); site: asv_bench/html/ (asv preview)"
exit "$status"
