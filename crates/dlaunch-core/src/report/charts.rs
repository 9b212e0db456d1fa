//! The report's SVG: a bar per process of each attempt in lanes per worker slot (binned in time
//! beyond what a screen shows), the time axis, the utilisation curve; and the small text
//! helpers the rest of the page shares.

use super::*;

/// One process of one attempt on the timeline.
pub(super) struct Bar<'a> {
    pub(super) attempt: &'a Attempt,
    pub(super) index: usize,
    pub(super) rank: u32,
    pub(super) host: String,
    pub(super) start: SystemTime,
    pub(super) end: SystemTime,
    pub(super) class: &'static str,
    pub(super) gpus: String,
    pub(super) ending: String,
}

pub(super) fn bars<'a>(attempts: &[&'a Attempt], now: SystemTime) -> Vec<Bar<'a>> {
    let mut bars = Vec::new();
    for (index, a) in attempts.iter().enumerate() {
        match &a.end {
            Some(end) if !end.processes.is_empty() => {
                for p in &end.processes {
                    // A gang's processes stopped because another ended; a cancelled one stays cancelled.
                    let class = match a.outcome() {
                        "cancelled" => "cancelled",
                        _ if p.ending == Ending::Stopped => "stopped",
                        outcome => outcome,
                    };
                    bars.push(Bar {
                        attempt: a,
                        index,
                        rank: p.rank,
                        host: p.host.clone(),
                        start: p.start.unwrap_or(a.start).max(a.start),
                        end: p.end.max(a.start),
                        class,
                        gpus: p.gpus.join(","),
                        ending: p.ending.describe(),
                    });
                }
            }
            Some(_) => {}
            None => {
                for p in &a.assigned {
                    bars.push(Bar {
                        attempt: a,
                        index,
                        rank: p.rank,
                        host: p.host.clone(),
                        start: a.start,
                        end: now.max(a.start),
                        class: "running",
                        gpus: String::new(),
                        ending: "running".into(),
                    });
                }
            }
        }
    }
    bars
}

pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

pub(super) fn time_text(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn secs(s: f64) -> String {
    crate::spec::format_duration(std::time::Duration::from_secs_f64(s.max(0.0)))
}

/// Orders host names as people number them: node2 before node10, digits compared as numbers.
pub(super) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a, b);
    loop {
        match (x.chars().next(), y.chars().next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (m, rest_x) = split_digits(x);
                let (n, rest_y) = split_digits(y);
                let (m, n) = (m.trim_start_matches('0'), n.trim_start_matches('0'));
                let by_value = m.len().cmp(&n.len()).then_with(|| m.cmp(n));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                (x, y) = (rest_x, rest_y);
            }
            (Some(c), Some(d)) if c != d => return c.cmp(&d),
            (Some(c), Some(_)) => (x, y) = (&x[c.len_utf8()..], &y[c.len_utf8()..]),
        }
    }
}

pub(super) fn split_digits(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

/// Lanes: per host, per rank, as many as the rank ran processes at once (interval partitioning).
/// Returns each bar's lane, and the lanes' labels with the host of each.
pub(super) fn assign_lanes(bars: &[Bar]) -> (Vec<usize>, Vec<(String, String)>) {
    let mut order: Vec<usize> = (0..bars.len()).collect();
    order.sort_by(|&a, &b| {
        natural_cmp(&bars[a].host, &bars[b].host)
            .then((bars[a].rank, bars[a].start).cmp(&(bars[b].rank, bars[b].start)))
    });
    let mut lane_of = vec![0; bars.len()];
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut current: Option<(&str, u32)> = None;
    // Ends of the current rank's lanes, and the first lane index of the rank.
    let mut lane_ends: Vec<SystemTime> = Vec::new();
    let mut first = 0;
    for i in order {
        let bar = &bars[i];
        if current != Some((bar.host.as_str(), bar.rank)) {
            current = Some((bar.host.as_str(), bar.rank));
            lane_ends.clear();
            first = labels.len();
        }
        let lane = match lane_ends.iter().position(|&end| end <= bar.start) {
            Some(l) => l,
            None => {
                lane_ends.push(bar.start);
                labels.push((format!("rank {} slot {}", bar.rank, lane_ends.len() - 1), bar.host.clone()));
                lane_ends.len() - 1
            }
        };
        lane_ends[lane] = bar.end;
        lane_of[i] = first + lane;
    }
    (lane_of, labels)
}

pub(super) fn legend() -> String {
    ["succeeded", "failed", "retried", "interrupted", "cancelled", "stopped", "running"]
        .iter()
        .map(|c| format!(" <span class=\"key o-{c}\">{c}</span>"))
        .collect::<Vec<_>>()
        .join("")
}

pub(super) fn axis(out: &mut String, t0: SystemTime, span: f64, y: f64) {
    const TICKS: usize = 6;
    for i in 0..=TICKS {
        let f = i as f64 / TICKS as f64;
        let tx = LABEL_WIDTH + f * PLOT_WIDTH;
        let label = secs(f * span);
        let _ = writeln!(
            out,
            "<line class=\"tick\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"14\" y2=\"{y:.1}\"/><text class=\"tick-label\" x=\"{tx:.1}\" y=\"{:.1}\">+{label}</text>",
            y + 12.0
        );
    }
    let _ = writeln!(out, "<text class=\"tick-label\" x=\"{LABEL_WIDTH}\" y=\"10\">{}</text>", time_text(t0));
}

/// Each lane as `BINS` columns, a column coloured by the outcome that used most of it; runs of
/// equal columns are merged into one rectangle.
pub(super) fn binned_lanes(
    out: &mut String,
    bars: &[Bar],
    lane_of: &[usize],
    lane_y: &[f64],
    t0: SystemTime,
    span: f64,
) {
    const CLASSES: [&str; 7] = ["succeeded", "failed", "retried", "interrupted", "cancelled", "stopped", "running"];
    let mut per_lane: HashMap<usize, Vec<[f64; 7]>> = HashMap::new();
    for (i, bar) in bars.iter().enumerate() {
        let cols = per_lane.entry(lane_of[i]).or_insert_with(|| vec![[0.0; 7]; BINS]);
        let class = CLASSES.iter().position(|c| *c == bar.class).unwrap_or(0);
        let a = bar.start.duration_since(t0).unwrap_or_default().as_secs_f64() / span * BINS as f64;
        let b = bar.end.duration_since(t0).unwrap_or_default().as_secs_f64() / span * BINS as f64;
        let (first, last) = (a.floor() as usize, (b.ceil() as usize).min(BINS));
        for (col, cell) in cols.iter_mut().enumerate().take(last).skip(first.min(BINS)) {
            let overlap = b.min(col as f64 + 1.0) - a.max(col as f64);
            cell[class] += overlap.max(0.0);
        }
    }
    let width = PLOT_WIDTH / BINS as f64;
    for (lane, cols) in per_lane {
        let winner = |cell: &[f64; 7]| {
            let (best, used) =
                cell.iter().enumerate().fold((0, 0.0), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
            (used > 0.05).then_some(best)
        };
        let mut col = 0;
        while col < BINS {
            let Some(class) = winner(&cols[col]) else {
                col += 1;
                continue;
            };
            let start = col;
            while col < BINS && winner(&cols[col]) == Some(class) {
                col += 1;
            }
            let _ = writeln!(
                out,
                "<rect class=\"bin o-{}\" x=\"{:.2}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{:.1}\"/>",
                CLASSES[class],
                LABEL_WIDTH + start as f64 * width,
                lane_y[lane] + 1.0,
                (col - start) as f64 * width,
                LANE_HEIGHT - 2.0
            );
        }
    }
}

/// Busy CPUs and GPUs over time, as a fraction of what the workers have.
pub(super) fn curve(out: &mut String, g: &Gathered, bars: &[Bar], t0: SystemTime, span: f64) {
    let cpus_total: f64 = g.view.workers.values().map(|w| f64::from(w.capacity.cpus)).sum();
    let gpus_total: f64 = g.view.workers.values().map(|w| f64::from(w.capacity.gpus)).sum();
    let at = |t: SystemTime| t.duration_since(t0).unwrap_or_default().as_secs_f64();
    // Step changes (time, Δcpus, Δgpus, Δprocesses), swept once.
    let mut steps: Vec<(f64, f64, f64, f64)> = Vec::with_capacity(2 * bars.len());
    for bar in bars {
        let cpus =
            bar.attempt.assigned.iter().find(|p| p.rank == bar.rank).map_or(0.0, |p| f64::from(p.resources.cpus));
        let gpus = if bar.gpus.is_empty() { 0.0 } else { bar.gpus.split(',').count() as f64 };
        steps.push((at(bar.start), cpus, gpus, 1.0));
        steps.push((at(bar.end), -cpus, -gpus, -1.0));
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut samples: Vec<(f64, f64, f64)> = Vec::with_capacity(CURVE_POINTS + 1);
    let (mut cpus, mut gpus, mut procs, mut next) = (0.0, 0.0, 0.0, 0);
    let mut max_procs: f64 = 1.0;
    for i in 0..=CURVE_POINTS {
        let t = span * i as f64 / CURVE_POINTS as f64;
        while next < steps.len() && steps[next].0 <= t {
            cpus += steps[next].1;
            gpus += steps[next].2;
            procs += steps[next].3;
            next += 1;
        }
        max_procs = max_procs.max(procs);
        samples.push((cpus, gpus, procs));
    }
    let _ = write!(
        out,
        "<h2>Utilisation over time</h2>\n<p class=\"note\"><span class=\"key c-cpu\">CPUs busy</span> <span class=\"key c-gpu\">GPUs busy</span> <span class=\"key c-proc\">processes running</span> (CPUs and GPUs as a share of all workers have; processes of the most at once)</p>\n<svg id=\"utilisation\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\">\n",
        LABEL_WIDTH + PLOT_WIDTH + 10.0,
        CURVE_HEIGHT + 20.0
    );
    let _ = writeln!(
        out,
        "<rect class=\"frame\" x=\"{LABEL_WIDTH}\" y=\"5\" width=\"{PLOT_WIDTH}\" height=\"{CURVE_HEIGHT}\"/><text class=\"tick-label\" x=\"{}\" y=\"14\">100%</text><text class=\"tick-label\" x=\"{}\" y=\"{}\">0</text>",
        LABEL_WIDTH - 30.0,
        LABEL_WIDTH - 14.0,
        CURVE_HEIGHT + 5.0
    );
    type Pick = fn(&(f64, f64, f64)) -> f64;
    let series: [(&str, f64, Pick); 3] =
        [("c-cpu", cpus_total, |s| s.0), ("c-gpu", gpus_total, |s| s.1), ("c-proc", max_procs, |s| s.2)];
    for (class, total, pick) in series {
        if total <= 0.0 {
            continue;
        }
        let points: Vec<String> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let px = LABEL_WIDTH + PLOT_WIDTH * i as f64 / CURVE_POINTS as f64;
                let py = 5.0 + CURVE_HEIGHT * (1.0 - (pick(s) / total).clamp(0.0, 1.0));
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = writeln!(out, "<polyline class=\"curve {class}\" points=\"{}\"/>", points.join(" "));
    }
    out.push_str("</svg>\n");
}
