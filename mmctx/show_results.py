"""``tools/test.py --show / --show-dir / --wait-time``: draw the predictions
of a test run, like the ``trigger_visualization_hook`` of upstream mmdet 3.3.0,
mmseg 1.2.2 and mmpretrain 1.2.0 ``tools/test.py``.

:func:`trigger_visualization_hook` switches the config's visualization hook on
(``default_hooks.visualization``), whatever toolbox the config belongs to:

- mmdet (``DetVisualizationHook`` and mmdet's other hooks): ``draw=True``,
  ``show``, ``wait_time``, ``test_out_dir`` -- one drawn image per test image,
  ``DIR/<image file name>`` (ground truth left, prediction right);
- mmseg (``SegVisualizationHook``): ``draw=True``, ``interval=1`` (every test
  image; upstream keeps the hook's interval of 50, so a small test set draws
  nothing), ``show``, ``wait_time``, and ``visualizer.save_dir = DIR``: the
  images go to ``DIR/vis_data/vis_image/test_<image>_<step>.png`` (ground
  truth left, prediction right);
- mmpretrain (``VisualizationHook``): ``enable=True``, ``interval=1``,
  ``show``, ``wait_time``, ``out_dir = DIR``: ``DIR/<image>_0.png``.

Differences from upstream, on purpose:

- ``DIR`` is taken relative to the current directory and made absolute. (The
  help of upstream's tools says ``work_dir/timestamp/DIR``; mmdet's hook joins
  a relative ``test_out_dir`` onto ``work_dir/timestamp`` again at every test
  iteration, nesting the folders deeper and deeper, and mmseg uses it relative
  to the current directory.)
- ``--show`` without a display (Linux / BSD with neither ``DISPLAY`` nor
  ``WAYLAND_DISPLAY`` set) is refused up front with :class:`NoDisplayError`,
  before anything is built, instead of failing or hanging inside matplotlib /
  OpenCV after the model has run.
"""
import os
import os.path as osp
import sys

__all__ = ['NoDisplayError', 'check_display', 'trigger_visualization_hook']


class NoDisplayError(RuntimeError):
    """``--show`` was asked for where no window can be opened."""


def has_display(environ=None):
    """Whether a window can be opened: always on Windows and macOS, else
    when ``DISPLAY`` (X11) or ``WAYLAND_DISPLAY`` is set."""
    environ = os.environ if environ is None else environ
    if sys.platform.startswith(('win', 'darwin')):
        return True
    return bool(environ.get('DISPLAY') or environ.get('WAYLAND_DISPLAY'))


def check_display(environ=None):
    """Raise :class:`NoDisplayError` (with what to do instead) when
    :func:`has_display` is false."""
    if not has_display(environ):
        raise NoDisplayError(
            '--show needs a display to open a window, and this machine has '
            'none (neither DISPLAY nor WAYLAND_DISPLAY is set, e.g. a server '
            'or an ssh session without X forwarding). Use --show-dir DIR to '
            'write the drawn predictions to image files instead, or run with '
            'a display (ssh -X, or DISPLAY=:0).')


def _hook_kind(hook_type, scope):
    name = str(hook_type).rsplit('.', 1)[-1] if isinstance(
        hook_type, str) else getattr(hook_type, '__name__', '')
    prefix = hook_type.split('.', 1)[0] if isinstance(
        hook_type, str) and '.' in hook_type else scope
    if name == 'SegVisualizationHook':
        return 'mmseg'
    if name == 'VisualizationHook' and prefix == 'mmpretrain':
        return 'mmpretrain'
    return 'mmdet'


def trigger_visualization_hook(cfg, show=False, show_dir=None,
                               wait_time=2.0, check=True):
    """Turn the config's visualization hook on for a test run (in place;
    returns ``cfg``). Nothing changes when neither ``show`` nor ``show_dir``
    is given. ``show_dir`` becomes an absolute path. With ``show`` and
    ``check``, :func:`check_display` runs first."""
    if not show and not show_dir:
        return cfg
    if show and check:
        check_display()
    hooks = cfg.get('default_hooks') or {}
    if 'visualization' not in hooks or not hooks['visualization']:
        raise RuntimeError(
            'VisualizationHook must be included in default_hooks: refer to '
            'usage "default_hooks = dict(visualization=dict('
            "type='DetVisualizationHook'))\" (or SegVisualizationHook / "
            'VisualizationHook) -- --show / --show-dir need it')
    hook = hooks['visualization']
    kind = _hook_kind(hook.get('type', ''), cfg.get('default_scope'))
    show_dir = osp.abspath(osp.expanduser(show_dir)) if show_dir else None
    if kind == 'mmpretrain':
        hook['enable'] = True
        hook['interval'] = 1
        hook['show'] = bool(show)
        hook['wait_time'] = wait_time
        hook['out_dir'] = show_dir
        return cfg
    hook['draw'] = True
    if show:
        hook['show'] = True
        hook['wait_time'] = wait_time
    if kind == 'mmseg':
        hook['interval'] = 1
        if show_dir:
            cfg.visualizer['save_dir'] = show_dir
    elif show_dir:
        hook['test_out_dir'] = show_dir
    return cfg
