# loss_argument_out_of_range.kt: DKD's weights cannot be negative
# expect: E404
graph loss_argument_out_of_range
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher -> student : through dkd(alpha=1, beta=-8, T=4)
