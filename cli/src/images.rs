//! PNG output: plots (RGB buffers) and sampled images tiled into a grid. Images arrive as token
//! values (one token per pixel channel, spec §9.4) with `levels` grey/colour levels.

use crate::error::{CliError, Result};
use std::path::Path;

fn encode(path: &Path, w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc
            .write_header()
            .map_err(|e| CliError::Plot(format!("PNG header: {e}")))?;
        wr.write_image_data(data)
            .map_err(|e| CliError::Plot(format!("PNG data: {e}")))?;
    }
    crate::fsutil::write_atomic(path, &bytes)
}

/// Write an RGB8 buffer (`w*h*3` bytes) as a PNG, atomically.
pub fn write_png_rgb(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<()> {
    encode(path, w, h, png::ColorType::Rgb, rgb)
}

/// The one image-shape type of the project (height × width × channels in HWC order, levels).
pub use maskdiff_data::ImageShape;

/// Colour of a still-masked pixel (token value `levels`) in snapshots of the reverse process.
pub const MASK_RGB: [u8; 3] = [255, 0, 160];

/// Tile `images` (token values in `0..levels`; the mask id `levels` is drawn in [`MASK_RGB`])
/// into a grid of `cols` columns (`None`: near-square), each pixel scaled up by `zoom`, with a
/// 2-pixel grey gutter, and write it as an RGB PNG.
pub fn write_grid(
    path: &Path,
    images: &[Vec<u32>],
    shape: ImageShape,
    zoom: usize,
    cols: Option<usize>,
) -> Result<()> {
    if images.is_empty() {
        return Err(CliError::Input("no images to write".into()));
    }
    if let Some(bad) = images
        .iter()
        .find(|im| im.len() != shape.tokens_per_image())
    {
        return Err(CliError::Input(format!(
            "an image has {} tokens, expected {}",
            bad.len(),
            shape.tokens_per_image()
        )));
    }
    let n = images.len();
    let cols = cols
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n);
    let rows = n.div_ceil(cols);
    let gut = 2;
    let (ch, cw) = (shape.height * zoom, shape.width * zoom);
    let (w, h) = (cols * (cw + gut) + gut, rows * (ch + gut) + gut);
    let mut rgb = vec![128u8; w * h * 3];
    let max = (shape.levels.max(2) - 1) as f64;
    for (k, im) in images.iter().enumerate() {
        let (oy, ox) = (gut + (k / cols) * (ch + gut), gut + (k % cols) * (cw + gut));
        for y in 0..ch {
            for x in 0..cw {
                let (py, px) = (y / zoom, x / zoom);
                let o = ((oy + y) * w + ox + x) * 3;
                let base = (py * shape.width + px) * shape.channels;
                if im[base..base + shape.channels]
                    .iter()
                    .any(|&v| v >= shape.levels)
                {
                    rgb[o..o + 3].copy_from_slice(&MASK_RGB);
                    continue;
                }
                for c in 0..3 {
                    let src = if shape.channels == 3 { c } else { 0 };
                    rgb[o + c] = (im[base + src] as f64 / max * 255.0).round() as u8;
                }
            }
        }
    }
    write_png_rgb(path, w as u32, h as u32, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_pixels_with_scaled_levels() {
        let p = std::env::temp_dir().join(format!("maskdiff-grid-{}.png", std::process::id()));
        let shape = ImageShape {
            height: 2,
            width: 2,
            channels: 1,
            levels: 17,
        };
        // Two images: all-16 (white) and all-0 (black) → 2 columns, 1 row, zoom 1.
        write_grid(&p, &[vec![16; 4], vec![0, 0, 0, 17]], shape, 1, None).unwrap();
        let mut r = png::Decoder::new(std::fs::File::open(&p).unwrap())
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2 * (2 + 2) + 2, 2 + 2 + 2));
        let px = |x: usize, y: usize| buf[(y * info.width as usize + x) * 3];
        assert_eq!(px(2, 2), 255, "level 16 of 17 is white");
        assert_eq!(px(6, 2), 0, "level 0 is black");
        assert_eq!(px(0, 0), 128, "gutter is grey");
        let rgb = |x: usize, y: usize| {
            let o = (y * info.width as usize + x) * 3;
            [buf[o], buf[o + 1], buf[o + 2]]
        };
        assert_eq!(
            rgb(7, 3),
            MASK_RGB,
            "the mask id is drawn in the mask colour"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
