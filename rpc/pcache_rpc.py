"""rpc.py plugin for the pcache SPDK bdev module.

Usage (from the repository root):
    PYTHONPATH=rpc /path/to/spdk/scripts/rpc.py -s SOCK --plugin pcache_rpc bdev_pcache_create ...

Methods: bdev_pcache_create, bdev_pcache_delete, bdev_pcache_get_stats,
bdev_pcache_flush_start, bdev_pcache_flush_status, bdev_pcache_set_options.
"""

import json


def _print(result):
    print(json.dumps(result, indent=2))


def bdev_pcache_create(args):
    params = {
        'name': args.name,
        'backing_bdev': args.backing_bdev,
    }
    # Exactly one of the two; the target explains what is wrong when both or neither are given.
    if args.cache_bdev is not None:
        params['cache_bdev'] = args.cache_bdev
    if args.cache_path is not None:
        params['cache_path'] = args.cache_path
    for key in ('cache_size_mib', 'gc_percent', 'stripe_size_kib', 'segment_size_mib', 'shards',
                'wb_max_inflight', 'wb_group_ksets', 'wb_high_pct', 'wb_low_pct', 'io_timeout_ms',
                'core', 'mode', 'seq_cutoff_bytes', 'seq_cutoff_policy', 'write_admission'):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.data_crc is not None:
        params['data_crc'] = args.data_crc
    if args.zero_copy is not None:
        params['zero_copy'] = args.zero_copy
    if args.defer:
        params['defer'] = True
    if args.backing_uuid_mismatch is not None:
        params['backing_uuid_mismatch'] = args.backing_uuid_mismatch
    _print(args.client.call('bdev_pcache_create', params))


def bdev_pcache_delete(args):
    params = {'name': args.name}
    if args.no_drain:
        params['no_drain'] = True
    _print(args.client.call('bdev_pcache_delete', params))


def bdev_pcache_set_options(args):
    params = {'name': args.name}
    for key in ('gc_percent', 'wb_max_inflight', 'wb_group_ksets', 'wb_high_pct', 'wb_low_pct',
                'io_timeout_ms', 'mode', 'seq_cutoff_bytes', 'seq_cutoff_policy',
                'write_admission'):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    _print(args.client.call('bdev_pcache_set_options', params))


def _writeback_args(p):
    p.add_argument('--wb-max-inflight', dest='wb_max_inflight', type=int,
                   help='backing writes in flight per shard during writeback (1-1024, default 32)')
    p.add_argument('--wb-group-ksets', dest='wb_group_ksets', type=int,
                   help='ksets per writeback group: one backing flush and control-slot write '
                        'each (1-4096, default 64)')
    p.add_argument('--wb-high-pct', dest='wb_high_pct', type=int,
                   help='start writing back when dirty data passes this percent of the cache '
                        '(1-100, default 50)')
    p.add_argument('--wb-low-pct', dest='wb_low_pct', type=int,
                   help='stop writing back below this percent (at most --wb-high-pct, default 40; '
                        'an idle, full or draining cache writes back everything)')
    p.add_argument('--io-timeout-ms', dest='io_timeout_ms', type=int,
                   help='a request that cannot make progress (cache full while writeback fails, '
                        'cache writes failing) fails with an I/O error after waiting this long; '
                        'failing writeback is retried meanwhile (100-3600000, default 30000)')
    p.add_argument('--mode', dest='mode',
                   choices=['write_back', 'write_through', 'write_around', 'pass_through'],
                   help='what writes do: write_back (default) logs them in the cache; '
                        'write_through also writes them to the backing bdev before completing; '
                        'write_around sends them to the backing bdev and drops cached copies; '
                        'pass_through caches nothing new. Stored on the cache; a live switch '
                        'keeps serving dirty data and writes it back in the background')
    p.add_argument('--seq-cutoff-bytes', dest='seq_cutoff_bytes', type=int,
                   help='a sequential stream past this many bytes (per shard) bypasses the '
                        'cache (multiple of 4096, 4096-268431360, default 1048576)')
    p.add_argument('--seq-cutoff-policy', dest='seq_cutoff_policy',
                   choices=['full', 'always', 'never'],
                   help='when the sequential cut-off applies: full (while cache space is short, '
                        'default), always, never')
    p.add_argument('--write-admission', dest='write_admission',
                   choices=['always', 'second_touch'],
                   help='which writes a full cache takes in: always (default), or second_touch: '
                        'a write to a range the cache does not hold goes to the backing bdev '
                        '(completing once durable there, so at its latency) unless the range '
                        'was read or written recently. Stored on the cache, like the mode')


def bdev_pcache_flush_start(args):
    _print(args.client.call('bdev_pcache_flush_start', {'name': args.name}))


def bdev_pcache_flush_status(args):
    _print(args.client.call('bdev_pcache_flush_status', {'name': args.name}))


def bdev_pcache_get_stats(args):
    params = {'name': args.name} if args.name else None
    _print(args.client.call('bdev_pcache_get_stats', params))


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser(
        'bdev_pcache_create',
        help='Create a pcache bdev: a write-back cache on CACHE_BDEV or CACHE_PATH in front '
             'of BACKING_BDEV (bdevs are claimed; the new bdev has the backing bdev\'s size)')
    p.add_argument('-b', '--name', required=True, help='name of the new pcache bdev')
    p.add_argument('-c', '--cache-bdev', dest='cache_bdev',
                   help='bdev holding the cache (fast device); or give --cache-path')
    p.add_argument('-p', '--cache-path', dest='cache_path',
                   help='DAX device (/dev/daxX.Y) or file mapped as the cache, without a bdev '
                        'round trip; a file that is not on a DAX filesystem is persisted with '
                        'msync and is NOT persistent memory (tests and trials)')
    p.add_argument('--cache-size-mib', dest='cache_size_mib', type=int,
                   help='with --cache-path: create the file, or extend it, to this size in MiB')
    p.add_argument('-d', '--backing-bdev', dest='backing_bdev', required=True,
                   help='bdev being cached (the slow device)')
    crc = p.add_mutually_exclusive_group()
    crc.add_argument('--data-crc', dest='data_crc', action='store_true', default=None,
                     help='keep and verify a CRC32C of every cached block (default: off)')
    crc.add_argument('--no-data-crc', dest='data_crc', action='store_false',
                     help='do not checksum cached data')
    zc = p.add_mutually_exclusive_group()
    zc.add_argument('--zero-copy', dest='zero_copy', action='store_true', default=None,
                    help='writeback borrows a malloc cache bdev\'s memory (zero-copy) instead '
                         'of copying it into a buffer (default: on)')
    zc.add_argument('--no-zero-copy', dest='zero_copy', action='store_false',
                    help='writeback always reads the cache bdev into a buffer')
    p.add_argument('--gc-percent', dest='gc_percent', type=int,
                   help='writeback keeps 100 minus this percent of the cache as headroom for writes: '
                        'free space plus segments with no dirty data (1-90, default 70)')
    p.add_argument('--stripe-size-kib', dest='stripe_size_kib', type=int,
                   help='stripe size in KiB: I/O is split at stripe edges, stripes map to shards '
                        '(multiple of 4, at most a quarter of a segment, default 1024 or a quarter of a segment)')
    p.add_argument('--segment-size-mib', dest='segment_size_mib', type=int,
                   help='cache log segment size in MiB (1-1024; default: a 128th of each '
                        'shard\'s part of the cache, a power of two from 1 to 16)')
    p.add_argument('--shards', type=int,
                   help='number of shards (1-256, default: one per core of the app)')
    p.add_argument('--core', type=int,
                   help='run a single engine thread, on this core (one of the app\'s cores; '
                        'default: one engine thread per core, at most one per shard)')
    p.add_argument('--defer', action='store_true',
                   help='a missing cache or backing bdev is not an error: the request waits and '
                        'the bdev is created when the missing bdev(s) appear (returns true; '
                        'bdev_pcache_get_stats lists it as "waiting for ...", bdev_pcache_delete '
                        'drops it); save_config writes every pcache bdev this way')
    p.add_argument('--backing-uuid-mismatch', dest='backing_uuid_mismatch',
                   choices=['refuse', 'accept'],
                   help='the backing bdev has the size the cache records but another UUID (an '
                        'aio or malloc bdev re-created without -u gets a new random one): '
                        '"refuse" (default) attaches nothing and says what the cache holds and '
                        'how to re-create the bdev with the recorded UUID; "accept" attaches it '
                        'with the cached data and records its new UUID in the cache. Accept '
                        'ONLY the very device the cache was written for: another device would '
                        'be served from this cache and get these writes written back over its '
                        'data. Not echoed by save_config (once recorded, a plain create '
                        'matches); a different size is always refused')
    _writeback_args(p)
    p.set_defaults(func=bdev_pcache_create)

    p = subparsers.add_parser('bdev_pcache_set_options',
                              help='Change writeback pacing, gc_percent, the mode and the sequential '
                                   'cut-off of a running pcache bdev (gc_percent, mode and cut-off '
                                   'are stored on the cache bdev; all are echoed by save_config)')
    p.add_argument('name', help='pcache bdev name')
    p.add_argument('--gc-percent', dest='gc_percent', type=int,
                   help='writeback keeps 100 minus this percent of the cache as headroom for writes (1-90)')
    _writeback_args(p)
    p.set_defaults(func=bdev_pcache_set_options)

    p = subparsers.add_parser('bdev_pcache_delete',
                              help='Delete a pcache bdev: write back every dirty block, unregister it '
                                   'and release both base bdevs (a pcache bdev still waiting for '
                                   'its base bdevs is just forgotten)')
    p.add_argument('name', help='pcache bdev name')
    p.add_argument('--no-drain', dest='no_drain', action='store_true',
                   help='do not write back first: dirty data stays on the cache bdev '
                        '(bdev_pcache_create with the same bdevs reattaches it)')
    p.set_defaults(func=bdev_pcache_delete)

    p = subparsers.add_parser('bdev_pcache_flush_start',
                              help='Start writing back every dirty block to the backing bdev')
    p.add_argument('name', help='pcache bdev name')
    p.set_defaults(func=bdev_pcache_flush_start)

    p = subparsers.add_parser('bdev_pcache_flush_status',
                              help='Dirty bytes left and whether the backing bdev holds every write')
    p.add_argument('name', help='pcache bdev name')
    p.set_defaults(func=bdev_pcache_flush_status)

    p = subparsers.add_parser('bdev_pcache_get_stats',
                              help='Statistics of pcache bdevs (all, or the one named): usage '
                                   '(clean/dirty/free), requests, errors, writeback, engine counters; '
                                   'pcache bdevs still waiting for a base bdev (deferred create, or '
                                   'a cache found by examine) are listed with "state": '
                                   '"waiting for <bdev>"')
    p.add_argument('-b', '--name', help='only this pcache bdev')
    p.set_defaults(func=bdev_pcache_get_stats)
