//! Soak ballast (`pvkit.soak_touch_mib=N`): N MiB of guest memory from 16 MiB up (clamped to
//! the RAM the memory map announces), every page filled at the start and then rewritten a few
//! pages per soak iteration, walking through the region, each page holding a pattern of its
//! index and the iteration that last wrote it. It gives snapshots and migrations memory to
//! carry (and pre-copy pages to chase); at the end every page must hold exactly what the
//! guest last wrote there, which the guest can work out from the walk alone.

use pvkit_protocol::abi;

/// Where the ballast starts: above the kernel, its pool, stack and page tables.
const BASE: u64 = 16 << 20;
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Pages rewritten per soak iteration.
pub const PAGES_PER_ITERATION: u64 = 8;
/// The command-line key with the ballast's size in MiB.
pub const TOUCH_KEY: &str = "pvkit.soak_touch_mib";

/// The region, its pages identity-mapped RAM no one else uses.
pub struct Ballast {
    pages: u64,
}

/// Word `w` of page `index` as written by iteration `generation` (0: the first fill).
fn word(index: u64, generation: u64, w: usize) -> u64 {
    (index << 32 | generation).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w as u64
}

impl Ballast {
    /// The ballast the command line asks for, inside RAM ending at `ram_top`.
    pub fn new(cmdline: &str, ram_top: u64) -> Option<Ballast> {
        let mib = abi::param(cmdline, TOUCH_KEY)?.parse::<u64>().ok()?;
        let end = BASE.saturating_add(mib << 20).min(ram_top);
        let pages = end.saturating_sub(BASE) / PAGE as u64;
        (pages >= PAGES_PER_ITERATION).then_some(Ballast { pages })
    }

    /// Its size in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn page(&self, index: u64) -> *mut u64 {
        (BASE + index * PAGE as u64) as *mut u64
    }

    fn write(&self, index: u64, generation: u64) {
        let page = self.page(index);
        for w in 0..WORDS {
            // SAFETY: `index` < `pages`, so the page lies in [BASE, ram_top): identity-mapped
            // RAM above everything the guest image, its pool and page tables occupy.
            unsafe { page.add(w).write_volatile(word(index, generation, w)) };
        }
    }

    fn holds(&self, index: u64, generation: u64) -> bool {
        let page = self.page(index);
        // SAFETY: as in `write`.
        (0..WORDS).all(|w| unsafe { page.add(w).read_volatile() } == word(index, generation, w))
    }

    /// Fills every page (generation 0).
    pub fn fill(&self) {
        for index in 0..self.pages {
            self.write(index, 0);
        }
    }

    /// Soak iteration `n` (from 1) rewrites the next [`PAGES_PER_ITERATION`] pages of the walk.
    pub fn touch(&self, n: u64) {
        let first = (n - 1) * PAGES_PER_ITERATION;
        for step in first..first + PAGES_PER_ITERATION {
            self.write(step % self.pages, n);
        }
    }

    /// Whether every page holds what the walk last wrote there after `iterations`; the pages
    /// that do not.
    pub fn verify(&self, iterations: u64) -> u64 {
        let steps = iterations * PAGES_PER_ITERATION;
        let mut wrong = 0;
        for index in 0..self.pages {
            // The last step of the walk that landed on this page, if any.
            let generation = if index < steps {
                let last = index + (steps - 1 - index) / self.pages * self.pages;
                last / PAGES_PER_ITERATION + 1
            } else {
                0
            };
            wrong += u64::from(!self.holds(index, generation));
        }
        wrong
    }
}
