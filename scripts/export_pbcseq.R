# Export the visit schedule of R survival's pbcseq (Mayo Clinic PBC trial) as inference/data/pbcseq_visits.csv.
# Usage: Rscript scripts/export_pbcseq.R inference/data/pbcseq_visits.csv
# Needs r-cran-survival (Debian: apt-get install r-cran-survival). Only what the withdrawal
# validation uses is kept: no laboratory values.
suppressMessages(library(survival))
out <- commandArgs(trailingOnly = TRUE)[1]
d <- pbcseq[order(pbcseq$id, pbcseq$day), c("id", "futime", "status", "trt", "age", "sex", "day")]
d$age <- round(d$age, 2)
header <- c(
  "# Mayo Clinic primary biliary cirrhosis (PBC) randomized trial, D-penicillamine vs placebo,",
  "# 312 patients, 1974-1984, one row per recorded visit: R package survival, data set pbcseq",
  paste0("# (survival ", packageVersion("survival"), ", LGPL (>= 2); data from Therneau & Grambsch (2000), Modeling Survival Data,"),
  "# Springer, and Murtaugh et al. (1994), Hepatology 20:126-134). Exported by scripts/export_pbcseq.R.",
  "# id: patient; futime: days from registration to death, transplant or end of follow-up; status: 0 censored,",
  "# 1 transplant, 2 dead; trt: 1 D-penicillamine (158 patients), 0 placebo (154; pbc codes it 2); age: years at",
  "# registration; sex: m/f;",
  "# day: study day of the visit (protocol visits at 6 months, 1 year, then yearly; extra visits occur).")
con <- file(out, "w")
writeLines(header, con)
write.csv(d, con, row.names = FALSE, quote = FALSE)
close(con)
