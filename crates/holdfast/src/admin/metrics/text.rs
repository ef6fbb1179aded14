//! The Prometheus text exposition format (version 0.0.4), written by hand: `# HELP`
//! and `# TYPE` per family, escaped label values, cumulative histogram buckets with
//! `+Inf`, `_sum` and `_count`.

use std::fmt::Write as _;

use crate::upstream::figures::{BUCKETS, HistogramSnapshot};

#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The exposition text being written. Writing to a `String` cannot fail, so the
/// `fmt::Result`s below are ignored.
#[derive(Default)]
pub struct Text {
    pub out: String,
}

impl Text {
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    pub fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {}", float(value));
    }

    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| float(*b));
            self.name_and_labels(&bucket, labels, Some(&le));
            let _ = writeln!(self.out, " {count}");
        }
        self.sample_f64(&format!("{name}_sum"), labels, h.sum_secs);
        self.sample(&format!("{name}_count"), labels, h.count());
    }

    pub fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let le = le.map(|v| ("le", v));
        for (i, (k, v)) in labels.iter().copied().chain(le).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }
}

/// Label values escape `\`, `"` and newline.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::figures::Histogram;

    #[test]
    fn families_samples_and_escaping() {
        let mut t = Text::default();
        t.family("x_total", Kind::Counter, "Things.\nMore.");
        t.sample("x_total", &[("a", "q\"uo\\te\nd")], 3);
        t.single("y", Kind::Gauge, "Y.", 1);
        assert_eq!(
            t.out,
            "# HELP x_total Things.\\nMore.\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"uo\\\\te\\nd\"} 3\n\
             # HELP y Y.\n# TYPE y gauge\ny 1\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        h.observe(Duration::from_secs(100));
        let mut t = Text::default();
        t.histogram("h_seconds", &[("r", "x")], &h.snapshot());
        let lines: Vec<&str> = t.out.lines().collect();
        assert_eq!(lines.len(), BUCKETS.len() + 3);
        assert_eq!(lines[0], "h_seconds_bucket{r=\"x\",le=\"0.001\"} 0");
        assert_eq!(lines[1], "h_seconds_bucket{r=\"x\",le=\"0.005\"} 2");
        assert!(lines.contains(&"h_seconds_bucket{r=\"x\",le=\"2.5\"} 3"));
        assert!(lines.contains(&"h_seconds_bucket{r=\"x\",le=\"60\"} 3"));
        assert_eq!(
            lines[BUCKETS.len()],
            "h_seconds_bucket{r=\"x\",le=\"+Inf\"} 4"
        );
        assert_eq!(lines[BUCKETS.len() + 1], "h_seconds_sum{r=\"x\"} 102.006");
        assert_eq!(lines[BUCKETS.len() + 2], "h_seconds_count{r=\"x\"} 4");
    }

    #[test]
    fn floats_render_as_prometheus_reads_them() {
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(4.0), "4");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NAN), "NaN");
    }
}
