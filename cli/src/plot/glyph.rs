//! A plotters drawing backend that renders text from the embedded 8×8 bitmap font of `font8x8`
//! (public domain), wrapping the PNG bitmap backend. Plots therefore need no system fonts and no
//! font libraries at build time; all other drawing is delegated unchanged.

use font8x8::UnicodeFonts;
use plotters::prelude::*;
use plotters_backend::{
    text_anchor::{HPos, VPos},
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

/// `BitMapBackend` with bitmap-font text.
pub struct GlyphBackend<'a> {
    inner: BitMapBackend<'a>,
}

impl<'a> GlyphBackend<'a> {
    pub fn new(inner: BitMapBackend<'a>) -> Self {
        GlyphBackend { inner }
    }
}

/// Integer scale of the 8-pixel font for a requested font size in pixels.
fn scale(size: f64) -> i32 {
    ((size / 12.0).round() as i32).max(1)
}

/// The 8×8 bitmap of `c` (row-major, bit 0 = leftmost pixel); unknown characters become '?'.
fn glyph(c: char) -> [u8; 8] {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

/// Width and height in pixels of `text` drawn at `size`.
pub fn text_size(text: &str, size: f64) -> (u32, u32) {
    let s = scale(size);
    ((8 * s * text.chars().count() as i32) as u32, (8 * s) as u32)
}

impl DrawingBackend for GlyphBackend<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        ul: BackendCoord,
        br: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(ul, br, style, fill)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(text_size(text, style.size()))
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let s = scale(style.size());
        let (w, h) = text_size(text, style.size());
        let (w, h) = (w as i32, h as i32);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -w,
            HPos::Center => -w / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let trans = style.transform();
        let (cw, ch) = self.get_size();
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..8 {
                    if row >> rx & 1 == 0 {
                        continue;
                    }
                    for sy in 0..s {
                        for sx in 0..s {
                            let x = (i as i32 * 8 + rx) * s + sx + dx;
                            let y = ry as i32 * s + sy + dy;
                            let (x, y) = trans.transform(x, y);
                            let (x, y) = (pos.0 + x, pos.1 + y);
                            if x >= 0 && y >= 0 && x < cw as i32 && y < ch as i32 {
                                self.inner.draw_pixel((x, y), color)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_without_system_fonts() {
        let (w, h) = (64u32, 16u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let root =
                GlyphBackend::new(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
            root.draw(&Text::new(
                "Ab1",
                (0, 0),
                ("sans-serif", 12).into_font().color(&BLACK),
            ))
            .unwrap();
            root.present().unwrap();
        }
        let dark = buf.chunks(3).filter(|p| p[0] < 128).count();
        // 'A', 'b', '1' in font8x8 light up a few dozen pixels; none outside the 24×8 box.
        assert!(dark > 20, "only {dark} pixels drawn");
        for y in 0..h {
            for x in 0..w {
                let p = ((y * w + x) * 3) as usize;
                if buf[p] < 128 {
                    assert!(x < 24 && y < 8, "pixel at ({x},{y}) outside the text box");
                }
            }
        }
    }
}
