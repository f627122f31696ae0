# syntax_misspelt_keyword.kt: `nod` for `node`
# expect: E100
graph syntax_misspelt_keyword
data digits { val_split = 300 }
nod a : cnn_tiny [target]
label -> a : through
