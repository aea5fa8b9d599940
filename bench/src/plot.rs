//! An SVG plot of acknowledged writes over time around a fault, one line per agent.

/// One line: points of (seconds since the fault, cumulative acknowledged writes).
pub struct Line {
    pub label: String,
    pub colour: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Renders the lines into a self-contained SVG.
pub fn svg(title: &str, lines: &[Line]) -> String {
    let (w, h, m) = (720.0, 360.0, 50.0);
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ymax = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max);
    let (xmin, xmax) = if xmin < xmax {
        (xmin, xmax)
    } else {
        (0.0, 1.0)
    };
    let sx = |x: f64| m + (x - xmin) / (xmax - xmin) * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / ymax * (h - 2.0 * m);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">seconds since the fault ({xmin:.1} … {xmax:.1})</text>
<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">acknowledged writes</text>
"#,
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    if xmin < 0.0 && xmax > 0.0 {
        out.push_str(&format!(
            r#"<line x1="{0}" y1="{m}" x2="{0}" y2="{1}" stroke="grey" stroke-dasharray="4"/>
"#,
            sx(0.0),
            h - m
        ));
    }
    for (i, line) in lines.iter().enumerate() {
        let pts: Vec<String> = line
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>
<text x="{}" y="{}" fill="{}">{}</text>
"#,
            line.colour,
            pts.join(" "),
            m + 10.0,
            m + 15.0 + 15.0 * i as f64,
            line.colour,
            line.label
        ));
    }
    out.push_str("</svg>\n");
    out
}
