"""Literal numpy transcriptions of the release's evaluation loops (evaluate() in its trainers),
shared by the evaluation tests. `forward(x)` maps an NHWC batch to NHWC logits (the model on the
batch alone, at its own size)."""
import numpy as np


def softmax_nchw(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sliding_window(forward, img_nchw, grid, num_classes):
    """The release's loop: windows at stride int(2/3 grid), clipped, softmax summed."""
    b, _, h, w = img_nchw.shape
    final = np.zeros((b, num_classes, h, w), np.float32)
    row = 0
    while row < h:
        col = 0
        while col < w:
            win = img_nchw[:, :, row: min(h, row + grid), col: min(w, col + grid)]
            pred = forward(win.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            final[:, :, row: min(h, row + grid), col: min(w, col + grid)] += softmax_nchw(pred)
            col += int(grid * 2 / 3)
        row += int(grid * 2 / 3)
    return final


def center_crop(forward, img_nchw, mask, crop):
    h, w = img_nchw.shape[-2:]
    start_h, start_w = (h - crop) // 2, (w - crop) // 2
    img = img_nchw[:, :, start_h:start_h + crop, start_w:start_w + crop]
    mask = mask[:, start_h:start_h + crop, start_w:start_w + crop]
    pred = forward(img.transpose(0, 2, 3, 1)).argmax(-1)
    return pred, mask


def intersection_and_union(output, target, k, ignore_index=255):
    """The release's intersectionAndUnion (util/utils.py)."""
    output, target = output.reshape(-1).copy(), target.reshape(-1)
    output[np.where(target == ignore_index)[0]] = ignore_index
    intersection = output[np.where(output == target)[0]]
    area_intersection, _ = np.histogram(intersection, bins=np.arange(k + 1))
    area_output, _ = np.histogram(output, bins=np.arange(k + 1))
    area_target, _ = np.histogram(target, bins=np.arange(k + 1))
    return area_intersection, area_output + area_target - area_intersection, area_target
