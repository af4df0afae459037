"""rpc.py plugin for the pcache SPDK bdev module.

Usage (from the repository root):
    PYTHONPATH=rpc /path/to/spdk/scripts/rpc.py -s SOCK --plugin pcache_rpc bdev_pcache_create ...

Methods: bdev_pcache_create, bdev_pcache_delete, bdev_pcache_get_stats.
"""

import json


def _print(result):
    print(json.dumps(result, indent=2))


def bdev_pcache_create(args):
    params = {
        'name': args.name,
        'cache_bdev': args.cache_bdev,
        'backing_bdev': args.backing_bdev,
    }
    for key in ('gc_percent', 'stripe_size_kib', 'segment_size_mib', 'shards'):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.data_crc is not None:
        params['data_crc'] = args.data_crc
    _print(args.client.call('bdev_pcache_create', params))


def bdev_pcache_delete(args):
    _print(args.client.call('bdev_pcache_delete', {'name': args.name}))


def bdev_pcache_get_stats(args):
    params = {'name': args.name} if args.name else None
    _print(args.client.call('bdev_pcache_get_stats', params))


def spdk_rpc_plugin_initialize(subparsers):
    p = subparsers.add_parser(
        'bdev_pcache_create',
        help='Create a pcache bdev: a write-back cache on CACHE_BDEV in front of BACKING_BDEV '
             '(both are claimed; the new bdev has the backing bdev\'s size)')
    p.add_argument('-b', '--name', required=True, help='name of the new pcache bdev')
    p.add_argument('-c', '--cache-bdev', dest='cache_bdev', required=True,
                   help='bdev holding the cache (persistent memory / fast device)')
    p.add_argument('-d', '--backing-bdev', dest='backing_bdev', required=True,
                   help='bdev being cached (the slow device)')
    crc = p.add_mutually_exclusive_group()
    crc.add_argument('--data-crc', dest='data_crc', action='store_true', default=None,
                     help='keep and verify a CRC32C of every cached block (default: on)')
    crc.add_argument('--no-data-crc', dest='data_crc', action='store_false',
                     help='do not checksum cached data')
    p.add_argument('--gc-percent', dest='gc_percent', type=int,
                   help='collect a segment when at most this percent of it is live (1-99, default 80)')
    p.add_argument('--stripe-size-kib', dest='stripe_size_kib', type=int,
                   help='stripe size in KiB: I/O is split at stripe edges, stripes map to shards '
                        '(multiple of 4, at most a quarter of a segment, default 1024)')
    p.add_argument('--segment-size-mib', dest='segment_size_mib', type=int,
                   help='cache log segment size in MiB (1-1024, default 16)')
    p.add_argument('--shards', type=int, help='number of shards (1-256, default 1)')
    p.set_defaults(func=bdev_pcache_create)

    p = subparsers.add_parser('bdev_pcache_delete',
                              help='Delete a pcache bdev (unregisters it and releases both base bdevs)')
    p.add_argument('name', help='pcache bdev name')
    p.set_defaults(func=bdev_pcache_delete)

    p = subparsers.add_parser('bdev_pcache_get_stats',
                              help='Per-bdev I/O counters of pcache bdevs (all, or the one named)')
    p.add_argument('-b', '--name', help='only this pcache bdev')
    p.set_defaults(func=bdev_pcache_get_stats)
