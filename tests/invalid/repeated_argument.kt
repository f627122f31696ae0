# repeated_argument.kt: one option given twice; neither silently wins
# expect: E407
graph repeated_argument
data digits { val_split = 300 }
node a : cnn_tiny [target]
node b : cnn_small
label -> a : through
label -> b : through
b     -> a : through kl(T=2, T=4)
