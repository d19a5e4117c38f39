"""Training curves from mmengine's json logs, like mmdet 3.3.0's
``tools/analysis_tools/analyze_logs.py plot_curve`` (seaborn + matplotlib).

mmengine's ``LocalVisBackend`` writes one json record per logged step to
``WORK_DIR/<timestamp>/vis_data/scalars.json`` (and the same records to
``vis_data/<timestamp>.json``): training records carry ``iter`` and ``step``
(the global iteration; ``epoch`` too when training by epochs), validation
records carry the metrics (``coco/bbox_mAP``, ``mIoU``, ``accuracy/top1``,
...) and ``step`` (the epoch, or the iteration for iteration-based loops).

:func:`plot_curve` draws, for every log and every key, the key against
``step``: training values against the iteration, metrics against the epoch or
iteration at which they were measured. A key matches a record's key exactly
or its last ``/`` part (``bbox_mAP`` matches ``coco/bbox_mAP``), as in
mmdet's tool. Unlike mmdet's, iteration-based logs (mmseg) work too.
"""
import json
import os.path as osp

__all__ = ['load_json_log', 'curve', 'plot_curve']


def load_json_log(path):
    """The records of one json log, in order (blank lines skipped)."""
    records = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno}: not a json log line '
                                 f'({e})') from None
    return records


def _match(record, key):
    if key in record:
        return key
    for name in record:
        if '/' in name and name.rsplit('/', 1)[-1] == key:
            return name
    return None


def curve(records, key):
    """``(xs, ys, x_label, is_train)`` of ``key`` in ``records``; raises
    ``KeyError`` naming the keys the log has when no record holds ``key``."""
    xs, ys, train = [], [], None
    by_epoch = any('epoch' in r for r in records if 'iter' in r)
    for i, record in enumerate(records):
        name = _match(record, key)
        if name is None:
            continue
        is_train = 'iter' in record
        train = is_train if train is None else train
        xs.append(record.get('step', record.get('iter', i + 1)))
        ys.append(record[name])
    if not xs:
        keys = sorted({k for r in records for k in r})
        raise KeyError(f'no record has the key {key!r}; the log has: '
                       f'{", ".join(keys)}')
    x_label = 'iter' if train or not by_epoch else 'epoch'
    return xs, ys, x_label, train


def plot_curve(json_logs, keys, out=None, legend=None, title=None,
               backend=None, style='dark'):
    """Plot ``keys`` of every log in ``json_logs`` into one figure; save it
    to ``out`` (format from the extension) or, without ``out``, show it.
    ``legend`` defaults to ``<log file name>_<key>``. Returns ``out``."""
    import matplotlib
    if backend is not None:
        matplotlib.use(backend)
    elif out is not None:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import seaborn as sns

    if isinstance(json_logs, str):
        json_logs = [json_logs]
    if isinstance(keys, str):
        keys = [keys]
    if legend is None:
        legend = [
            f'{osp.splitext(osp.basename(log))[0]}_{key}'
            for log in json_logs for key in keys
        ]
    if len(legend) != len(json_logs) * len(keys):
        raise ValueError(f'legend has {len(legend)} entries, expected '
                         f'{len(json_logs) * len(keys)} (logs x keys)')
    sns.set_style(style)
    fig = plt.figure()
    x_labels = set()
    for i, log in enumerate(json_logs):
        records = load_json_log(log)
        for j, key in enumerate(keys):
            try:
                xs, ys, x_label, train = curve(records, key)
            except KeyError as e:
                plt.close(fig)
                raise KeyError(f'{log}: {e.args[0]}') from None
            x_labels.add(x_label)
            label = legend[i * len(keys) + j]
            print(f'plot curve of {log}, metric is {key}')
            if train:
                plt.plot(xs, ys, label=label, linewidth=0.5)
            else:
                plt.plot(xs, ys, label=label, marker='o')
    plt.xlabel(' / '.join(sorted(x_labels)))
    plt.legend()
    if title is not None:
        plt.title(title)
    if out is None:
        plt.show()
    else:
        print(f'save curve to: {out}')
        plt.savefig(out)
    plt.close(fig)
    return out
