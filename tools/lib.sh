# Shared by the benchmark scripts (source it):
#   bench_tree FILE        the bench's source tree as a tar file (the first 5,000 files of the
#                          cargo registry sources on this machine), made when missing
#   stop_mount STORE MNT   unmount a background kvfs mount and wait for its daemon's clean exit
#   fresh_mount BIN STORE MNT  end any mount of STORE on MNT, format a new STORE with BIN and
#                          mount it on MNT; exits the script if it did not mount
#   drop_caches            sync and drop every cache (root)
#   secs CMD...            run CMD (its output dropped) and print the seconds it took, 2 decimals
bench_tree() {
    [ -s "$1" ] && return
    (cd "$HOME/.cargo/registry/src" && find . -type f | sort | awk 'NR <= 5000' > "$1.list" \
        && tar cf "$1" -T "$1.list")
}
stop_mount() {
    mountpoint -q "$2" && umount "$2"
    # That mount's daemon only: a past mount (--at) of the same store may stay up.
    while pgrep -f -- "mount $1 $2 .*--daemon-child" >/dev/null; do sleep 0.1; done
}
fresh_mount() {
    stop_mount "$2" "$3" || true
    rm -rf "$2"; mkdir -p "$2" "$3"; "$1" format "$2" >/dev/null; "$1" mount "$2" "$3"
    mountpoint -q "$3" || { echo "$1: $2 not mounted on $3" >&2; exit 1; }
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
secs() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }
